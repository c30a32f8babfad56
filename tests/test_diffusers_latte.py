"""Mobius for diffusers' LatteTransformer3DModel (alternating spatial and temporal transformer blocks), and
convert_to_parallel refusing, untouched, the models it does not understand."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import LatteTransformer3DModel  # noqa: E402

from pychop.integrations.diffusers import convert_to_parallel, patch_temporal_attention  # noqa: E402
from pychop.integrations.diffusers.latte import to_temporal  # noqa: E402
from pychop.integrations.diffusers.motion import TemporalAttentionProcessor  # noqa: E402
from tests.checks import relative_error  # noqa: E402

BATCH, FRAMES, CHANNELS, TOKENS = 2, 3, 16, 16  # tokens: (8 / patch 2) ** 2 per frame


def tiny_latte(seed):
    torch.manual_seed(seed)
    return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=CHANNELS // 2, in_channels=4,
                                   out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                   cross_attention_dim=CHANNELS, caption_channels=12, norm_type="ada_norm_single",
                                   video_length=FRAMES).double()


def latte_inputs():
    return (torch.randn(BATCH, 4, FRAMES, 8, 8, dtype=torch.float64), torch.tensor([10, 700]),
            torch.randn(BATCH, 5, 12, dtype=torch.float64))


def run(model, inputs):
    sample, timestep, text = inputs
    return model(sample, timestep=timestep, encoder_hidden_states=text).sample


def test_to_temporal_is_lattes_regrouping():
    frames = torch.randn(BATCH * FRAMES, TOKENS, CHANNELS)
    expected = frames.reshape(BATCH, FRAMES, TOKENS, CHANNELS).permute(0, 2, 1, 3).reshape(-1, FRAMES, CHANNELS)
    assert torch.equal(to_temporal(frames, FRAMES), expected)


def test_latte_pairs_run_in_parallel_and_revert_exactly(seed):
    model = tiny_latte(seed)
    inputs = latte_inputs()
    spatial, temporal = model.transformer_blocks[0], model.temporal_transformer_blocks[0]
    h = torch.randn(BATCH * FRAMES, TOKENS, CHANNELS, dtype=torch.float64)
    text = torch.randn(BATCH * FRAMES, 5, CHANNELS, dtype=torch.float64)
    embedding = torch.randn(1, FRAMES, CHANNELS, dtype=torch.float64)  # the temporal position embedding
    time_s = torch.randn(BATCH * FRAMES, 6 * CHANNELS, dtype=torch.float64)
    time_t = torch.randn(BATCH * TOKENS, 6 * CHANNELS, dtype=torch.float64)
    call_spatial = lambda x: spatial(x, None, text, None, time_s, None, None)
    call_temporal = lambda x: temporal(x, None, None, None, time_t, None, None)
    with torch.no_grad():
        original = run(model, inputs)
        s = call_spatial(h)
        temporal_input = to_temporal(h, FRAMES) + embedding
        expected = to_temporal(s, FRAMES) + embedding + (call_temporal(temporal_input) - temporal_input)
        serial = call_temporal(to_temporal(s, FRAMES) + embedding)

        conversion = convert_to_parallel(model)
        assert conversion.pair_names == ["transformer_blocks[0]", "transformer_blocks[1]"]
        assert conversion.attention.module_names == [f"temporal_transformer_blocks.{i}.attn1" for i in range(2)]
        assert isinstance(temporal.attn1.processor, TemporalAttentionProcessor)  # through pychop's ops
        parallel = call_temporal(to_temporal(call_spatial(h), FRAMES) + embedding)
        assert relative_error(parallel, expected) < 1e-12
        assert relative_error(parallel, serial) > 1e-3  # a different function
        converted = run(model, inputs)
    assert torch.isfinite(converted).all() and relative_error(converted, original) > 1e-4

    # The Mobius set-up: the temporal blocks train, nothing else gets a gradient.
    model.requires_grad_(False)
    model.temporal_transformer_blocks.requires_grad_(True)
    run(model, inputs).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("temporal_transformer_blocks."), name
    with pytest.raises(ValueError, match="already converted"):
        convert_to_parallel(model)

    conversion.revert()
    assert not isinstance(temporal.attn1.processor, TemporalAttentionProcessor)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(run(model, inputs), original)


def test_patch_temporal_attention_covers_serial_latte(seed):
    model = tiny_latte(seed)
    inputs = latte_inputs()
    with torch.no_grad():
        expected = run(model, inputs)
        with patch_temporal_attention(model, backend="torch") as patch:
            assert patch.module_names == [f"temporal_transformer_blocks.{i}.attn1" for i in range(2)]
            assert relative_error(run(model, inputs), expected) < 1e-12


class Wrapper(torch.nn.Module):
    """A model holding a Latte model: its blocks are not what convert_to_parallel converts."""

    def __init__(self, latte):
        super().__init__()
        self.latte = latte


class OtherBlock(torch.nn.Module):
    """Spatial and temporal lists of another model, named as diffusers' UNet blocks name theirs."""

    def __init__(self):
        super().__init__()
        self.attentions = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.temp_attentions = torch.nn.ModuleList([torch.nn.Linear(4, 4)])


@pytest.mark.parametrize("make,name", [(lambda seed: Wrapper(tiny_latte(seed)), "LatteTransformer3DModel"),
                                       (lambda seed: OtherBlock(), "OtherBlock")], ids=["wrapped-latte", "other"])
def test_models_it_does_not_understand_are_refused_untouched(make, name, seed):
    model = make(seed)
    state = [(m, dict(m.__dict__)) for m in model.modules()]
    with pytest.raises(ValueError, match=f"does not understand {name}.*changed nothing"):
        convert_to_parallel(model)
    assert all(m.__dict__ == before for m, before in state)


def test_latte_with_gradient_checkpointing_trains_as_without(seed):
    """diffusers checkpoints each block alone: a recomputed temporal block finds the h and s its first call
    used, so the gradients equal the converted model's without checkpointing, and so does the output."""
    results = []
    for checkpointing in (False, True):
        model = tiny_latte(seed)
        if checkpointing:
            model.enable_gradient_checkpointing()
        conversion = convert_to_parallel(model)
        model.train()
        torch.manual_seed(seed + 1)
        out = run(model, latte_inputs())
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        conversion.revert()
    (plain_out, plain_grads), (checkpointed_out, checkpointed_grads) = results
    assert relative_error(checkpointed_out, plain_out) < 1e-12
    assert len(plain_grads) == len(checkpointed_grads) > 0
    assert max(relative_error(a, b) for a, b in zip(checkpointed_grads, plain_grads)) < 1e-10

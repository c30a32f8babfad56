"""pychop.memory.lean_frozen on a tiny diffusers UNetMotionModel, serial and converted to the parallel form:
exact in float64, text keys and values folded across frames where the text repeats, removed exactly."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from pychop.chopgrad.memory import SavedActivationMeter  # noqa: E402
from pychop.integrations.diffusers import convert_to_parallel  # noqa: E402
from pychop.integrations.diffusers.lean import RepeatedRows, repeated_rows  # noqa: E402
from pychop.memory import lean_frozen  # noqa: E402
from tests.test_diffusers_mobius import BATCH, FRAMES, TEXT_DIM, tiny_motion_unet  # noqa: E402
from tests.test_memory_lean import assert_same_step, training_step  # noqa: E402


def motion_unet(seed):
    unet = tiny_motion_unet(seed).double()
    unet.freeze_unet2d_params()  # only the motion modules train
    return unet


def unet_inputs(shared_text):
    text = torch.randn(BATCH, 5, TEXT_DIM, dtype=torch.float64)
    text = text.repeat_interleave(FRAMES, dim=0) if shared_text else torch.randn(BATCH * FRAMES, 5, TEXT_DIM,
                                                                                  dtype=torch.float64)
    return torch.randn(BATCH, 4, FRAMES, 8, 8, dtype=torch.float64), torch.tensor([10, 700]), text


class Sample(torch.nn.Module):
    """The UNet's sample (its output object's tensor), for training_step."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, *inputs):
        return self.unet(*inputs).sample


def saved_bytes(unet, inputs):
    return SavedActivationMeter(unet).measure(lambda: unet(*inputs))


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
@pytest.mark.parametrize("form", ["serial", "parallel"])
def test_motion_unet_lean_is_exact_and_removable(form, recompute, seed):
    unet = motion_unet(seed)
    conversion = convert_to_parallel(unet) if form == "parallel" else None
    model, inputs = Sample(unet), unet_inputs(shared_text=True)
    expected = training_step(model, inputs)
    plain_bytes = saved_bytes(unet, inputs)
    processors = dict(unet.attn_processors)
    forwards = {name: m.__dict__.get("forward") for name, m in unet.named_modules()}

    handle = lean_frozen(unet, recompute=recompute)
    assert handle.convolutions and handle.activations and handle.cross_attentions
    assert all(name.endswith(".attn2") for name in handle.cross_attentions)
    if recompute:
        assert "down_blocks.0.resnets.0" in handle.regions
        assert not any("motion_modules" in name or "samplers" in name for name in handle.regions)
        # The Mobius conversion replaced the spatial transformers' forward: their blocks are the regions.
        spatial = "down_blocks.0.attentions.0" + (".transformer_blocks.0" if conversion else "")
        assert spatial in handle.regions
    assert_same_step(training_step(model, inputs), expected, 1e-12)
    assert saved_bytes(unet, inputs) < (0.8 if recompute else 0.95) * plain_bytes

    handle.remove()
    assert unet.attn_processors == processors  # the very same processor objects
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == forwards
    out, _ = training_step(model, inputs)
    assert torch.equal(out, expected[0])
    if conversion:
        conversion.revert()


def test_cross_attention_folds_frames_only_where_the_text_repeats(seed):
    unet = motion_unet(seed)
    model = Sample(unet)
    shared, distinct = unet_inputs(shared_text=True), unet_inputs(shared_text=False)
    expected = [training_step(model, inputs) for inputs in (shared, distinct)]
    with lean_frozen(unet):
        lean_bytes = [saved_bytes(unet, inputs) for inputs in (shared, distinct)]
        for inputs, step in zip((shared, distinct), expected):
            assert_same_step(training_step(model, inputs), step, 1e-12)
    # The same shapes: one copy of the keys and values per video saves (FRAMES - 1) copies of them per module.
    heads_dim, modules = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.inner_dim, 4
    assert lean_bytes[1] - lean_bytes[0] == 2 * modules * (FRAMES - 1) * BATCH * 5 * heads_dim * 8


def test_repeated_rows():
    a, b, c = torch.randn(3, 2, 4)
    assert repeated_rows(torch.stack([a, a, a, b, b, b])) == 3
    assert repeated_rows(torch.stack([a, a, b, b, b, b])) == 2  # runs of 2 and 4: blocks of 2 are constant
    assert repeated_rows(torch.stack([a, a, b, c])) == 1
    assert repeated_rows(torch.stack([a])) == 1
    nan = torch.full_like(a, float("nan"))
    assert repeated_rows(torch.stack([nan, nan])) == 1  # not equal: not folded
    rows, text = RepeatedRows(), torch.stack([a, a])
    assert rows(text) == 2
    text[1] = b  # in place: the version counter tells
    assert rows(text) == 1


def test_only_row_wise_processors_fold(seed):
    unet = motion_unet(seed)
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert isinstance(attn2.processor, AttnProcessor2_0)
    custom = type("CustomProcessor", (AttnProcessor2_0,), {})
    unet.set_attn_processor(custom())
    with lean_frozen(unet) as handle:
        assert handle.cross_attentions == []  # a subclass may compute anything


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_motion_unet_under_autocast(recompute, seed):
    unet = tiny_motion_unet(seed)
    unet.freeze_unet2d_params()
    model = Sample(unet)
    inputs = tuple(x.float() if x.is_floating_point() else x for x in unet_inputs(shared_text=True))
    expected = training_step(model, inputs, autocast=True)
    with lean_frozen(unet, recompute=recompute):
        out, grads = training_step(model, inputs, autocast=True)
    assert out.dtype == torch.bfloat16
    assert_same_step((out, grads), expected, 1e-3)  # gradients summed in another order: float32 rounding

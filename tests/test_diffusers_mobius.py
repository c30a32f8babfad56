"""pychop.integrations.diffusers on tiny random diffusers models (no weight downloads)."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet3DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel  # noqa: E402
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel, TransformerTemporalModel  # noqa: E402
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D  # noqa: E402

from pychop.integrations.diffusers.mobius import convert_to_parallel, parallel_pairs  # noqa: E402
from pychop.integrations.diffusers.motion import (  # noqa: E402
    TemporalAttentionProcessor,
    patch_temporal_attention,
    temporal_attention_modules,
)
from tests.checks import relative_error, runnable_backends  # noqa: E402

BATCH, FRAMES, TEXT_DIM = 2, 3, 24


def tiny_motion_unet(seed):
    torch.manual_seed(seed)
    return UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=TEXT_DIM,
                           num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8)


def tiny_unet_3d(seed):
    torch.manual_seed(seed)
    return UNet3DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8)


def tiny_svd_unet(seed):
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), num_attention_heads=(2, 4),
        cross_attention_dim=TEXT_DIM, addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        num_frames=FRAMES)


def unet_inputs():
    """Inputs of `tiny_motion_unet`."""
    sample = torch.randn(BATCH, 4, FRAMES, 8, 8)  # (B, C, T, H, W)
    text = torch.randn(BATCH * FRAMES, 5, TEXT_DIM)  # one copy per frame, as diffusers' pipelines pass it
    return sample, torch.tensor([10, 700]), text


def unet_3d_inputs():
    """Inputs of `tiny_unet_3d`: as `unet_inputs`, but one text per video (the model repeats it per frame)."""
    sample, timesteps, _ = unet_inputs()
    return sample, timesteps, torch.randn(BATCH, 5, TEXT_DIM)


def svd_inputs():
    """Inputs of `tiny_svd_unet`: sample (B, T, C, H, W), timesteps, image embedding, added time ids."""
    return (torch.randn(BATCH, FRAMES, 8, 8, 8), torch.tensor([10, 700]), torch.randn(BATCH, 1, TEXT_DIM),
            torch.randn(BATCH, 3))


def forward_backward(model, inputs, call=None):
    out = call(model, inputs) if call else model(*inputs).sample
    model.zero_grad()
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------------------
# Temporal attention processors.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", runnable_backends(interpreted=False))
def test_motion_patch_matches_unpatched_and_removes_cleanly(backend, seed):
    unet = tiny_motion_unet(seed)
    inputs = unet_inputs()
    before = {name: p for name, p in unet.attn_processors.items()}
    out_ref, grads_ref = forward_backward(unet, inputs)

    patch = patch_temporal_attention(unet, backend=backend)
    names = patch.module_names
    assert len(names) == 2 * sum(isinstance(m, AnimateDiffTransformer3D) for m in unet.modules())  # attn1, attn2
    assert all(".motion_modules." in n for n in names)
    for name, processor in unet.attn_processors.items():
        patched = name.removesuffix(".processor") in names
        assert isinstance(processor, TemporalAttentionProcessor) == patched, name
    out, grads = forward_backward(unet, inputs)
    assert relative_error(out.double(), out_ref.double()) < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert relative_error(grads[name].double(), grads_ref[name].double()) < 1e-4, name

    # The patched path is live: diffusers' own processor ignores attn.scale, pychop's honours it.
    first = dict(temporal_attention_modules(unet))[names[0]]
    first.scale *= 3.0
    assert relative_error(unet(*inputs).sample.detach().double(), out_ref.double()) > 1e-5
    first.scale /= 3.0

    patch.remove()
    assert unet.attn_processors == before  # the very same processor objects
    assert torch.equal(unet(*inputs).sample.detach(), out_ref)


def test_patch_covers_temporal_transformers(seed):
    torch.manual_seed(seed)
    svd = TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                         cross_attention_dim=TEXT_DIM)
    hidden = torch.randn(BATCH * FRAMES, 32, 4, 4)
    context = torch.randn(BATCH * FRAMES, 3, TEXT_DIM)
    indicator = torch.zeros(BATCH, FRAMES)
    call_svd = lambda m, x: m(x[0], encoder_hidden_states=x[1], image_only_indicator=x[2], return_dict=False)[0]

    temporal = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                        norm_num_groups=4)
    call_temporal = lambda m, x: m(x[0], num_frames=FRAMES, return_dict=False)[0]

    for model, inputs, call in ((svd, (hidden, context, indicator), call_svd), (temporal, (hidden,), call_temporal)):
        out_ref, grads_ref = forward_backward(model, inputs, call)
        with patch_temporal_attention(model, backend="torch") as patch:
            assert patch.module_names and all("temporal" in n or "transformer_blocks" in n
                                              for n in patch.module_names)
            assert all(not m.is_cross_attention for _, m in temporal_attention_modules(model))
            out, grads = forward_backward(model, inputs, call)
        assert relative_error(out.double(), out_ref.double()) < 1e-5, type(model).__name__
        for name in grads_ref:
            assert relative_error(grads[name].double(), grads_ref[name].double()) < 1e-4, name
        assert torch.equal(call(model, inputs).detach(), out_ref)


def test_patch_refuses_models_without_temporal_attention():
    with pytest.raises(ValueError, match="has no temporal self-attention modules"):
        patch_temporal_attention(torch.nn.Linear(4, 4))


# --------------------------------------------------------------------------------------------------------------
# The Mobius converter.
# --------------------------------------------------------------------------------------------------------------

def test_converter_rewires_pairs_in_parallel_and_reverts_exactly(seed):
    unet = tiny_motion_unet(seed)
    inputs = unet_inputs()
    with torch.no_grad():
        original = unet(*inputs).sample

        # The parallel function of one rewired stage, composed by hand from the original modules.
        block = unet.down_blocks[0]
        h = torch.randn(BATCH * FRAMES, 16, 8, 8)
        temb = torch.randn(BATCH * FRAMES, unet.time_embedding.linear_2.out_features)
        text = inputs[2]
        r = block.resnets[0](h, temb)
        expected = block.attentions[0](r, encoder_hidden_states=text, return_dict=False)[0] \
            + block.motion_modules[0](r, num_frames=FRAMES) - r
        serial_stage = block(h, temb, encoder_hidden_states=text, num_frames=FRAMES)[1][0]  # before downsampling

        conversion = convert_to_parallel(unet)
        assert conversion.pair_names == [name for name, _, _ in parallel_pairs(unet)] and conversion.pair_names
        parallel_stage = block(h, temb, encoder_hidden_states=text, num_frames=FRAMES)[1][0]
        assert relative_error(parallel_stage.double(), expected.double()) < 1e-6
        assert relative_error(parallel_stage.double(), serial_stage.double()) > 1e-3  # a different function
        converted = unet(*inputs).sample
        assert torch.isfinite(converted).all()
        assert relative_error(converted.double(), original.double()) > 1e-4

    unet.freeze_unet2d_params()  # diffusers' switch: only the motion modules train
    unet(*inputs).sample.square().mean().backward()
    for name, p in unet.named_parameters():
        if "motion_modules" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"{name} is spatial but got a gradient"
    assert sum(p.grad.abs().sum() for n, p in unet.named_parameters() if "motion_modules" in n) > 0

    with pytest.raises(ValueError, match="already converted"):
        convert_to_parallel(unet)
    conversion.revert()
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, original)


def check_training_and_revert(unet, inputs, original, conversion, trains):
    """The converted `unet` is finite and a different function from `original`; with only the parameters whose
    names satisfy `trains` trainable, exactly those get gradients; `conversion.revert()` restores it exactly."""
    with torch.no_grad():
        converted = unet(*inputs).sample
    assert torch.isfinite(converted).all()
    assert relative_error(converted.double(), original.double()) > 1e-4
    for name, p in unet.named_parameters():
        p.requires_grad_(trains(name))
    unet(*inputs).sample.square().mean().backward()
    for name, p in unet.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert sum(p.grad.abs().sum() for p in unet.parameters() if p.grad is not None) > 0
    conversion.revert()
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, original)


def test_converter_rewires_unet_3d_temporal_transformers_and_reverts_exactly(seed):
    unet = tiny_unet_3d(seed)
    inputs = unet_3d_inputs()
    text = inputs[2]
    with torch.no_grad():
        original = unet(*inputs).sample

        # One rewired layer of a CrossAttnDownBlock3D (resnet, temporal conv, then the pair), composed by hand.
        block = unet.down_blocks[0]
        h = torch.randn(BATCH * FRAMES, 16, 8, 8)
        temb = torch.randn(BATCH * FRAMES, unet.time_embedding.linear_2.out_features)
        frame_text = text.repeat_interleave(FRAMES, dim=0)
        r = block.temp_convs[0](block.resnets[0](h, temb), num_frames=FRAMES)
        expected = block.attentions[0](r, encoder_hidden_states=frame_text, return_dict=False)[0] \
            + block.temp_attentions[0](r, num_frames=FRAMES, return_dict=False)[0] - r
        stage = lambda: block(h, temb, encoder_hidden_states=frame_text, num_frames=FRAMES)[1][0]
        serial_stage = stage()

        conversion = convert_to_parallel(unet)
        assert conversion.pair_names == ["down_blocks.0.attentions[0]", "up_blocks.1.attentions[0]",
                                         "up_blocks.1.attentions[1]", "mid_block.attentions[0]"]
        parallel_stage = stage()
        assert relative_error(parallel_stage.double(), expected.double()) < 1e-6
        assert relative_error(parallel_stage.double(), serial_stage.double()) > 1e-3  # a different function
        # The output object of a return_dict=True call keeps its type.
        spatial_out = block.attentions[0](r, encoder_hidden_states=frame_text, return_dict=False)[0]
        sample_out = block.temp_attentions[0](spatial_out, num_frames=FRAMES)
        assert relative_error(sample_out.sample.double(), expected.double()) < 1e-6
    # The Mobius setup: only the paired temporal transformers train.
    check_training_and_revert(unet, inputs, original, conversion, lambda name: ".temp_attentions." in name)


@pytest.mark.slow
def test_converter_rewires_stable_video_diffusion_blocks_and_reverts_exactly(seed):
    unet = tiny_svd_unet(seed)
    inputs = svd_inputs()
    with torch.no_grad():
        original = unet(*inputs).sample

        # One pair, composed by hand: the temporal block reads h + e (not s + e) and adds its update to s + e.
        transformer = unet.down_blocks[0].attentions[0]
        spatial, temporal = transformer.transformer_blocks[0], transformer.temporal_transformer_blocks[0]
        h = torch.randn(BATCH * FRAMES, 16, 32)
        embedding = torch.randn(BATCH * FRAMES, 1, 32)
        context, time_context = torch.randn(BATCH * FRAMES, 1, TEXT_DIM), torch.randn(BATCH * 16, 1, TEXT_DIM)
        call_temporal = lambda x: temporal(x, num_frames=FRAMES, encoder_hidden_states=time_context)
        s = spatial(h, encoder_hidden_states=context)
        expected = s + embedding + (call_temporal(h + embedding) - (h + embedding))
        serial = call_temporal(s + embedding)

        conversion = convert_to_parallel(unet)
        assert conversion.pair_names == [f"{stage}.transformer_blocks[0]" for stage in (
            "down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
            "mid_block.attentions.0")]
        parallel = call_temporal(spatial(h, encoder_hidden_states=context) + embedding)
        assert relative_error(parallel.double(), expected.double()) < 1e-6
        assert relative_error(parallel.double(), serial.double()) > 1e-3
    check_training_and_revert(unet, inputs, original, conversion,
                              lambda name: ".temporal_transformer_blocks." in name)


def test_converter_composes_with_the_processors_and_refuses_bad_models(seed):
    unet = tiny_motion_unet(seed)
    inputs = unet_inputs()
    conversion = convert_to_parallel(unet)
    with torch.no_grad():
        converted = unet(*inputs).sample
        with patch_temporal_attention(unet, backend="torch"):
            assert relative_error(unet(*inputs).sample.double(), converted.double()) < 1e-5
    conversion.revert()
    svd_transformer = TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32)
    svd_transformer.temporal_transformer_blocks[0].is_res = False  # as when its inner width differs
    with pytest.raises(ValueError, match="has no residual connection"):
        convert_to_parallel(svd_transformer)
    with pytest.raises(ValueError, match="no spatial transformer \\+ temporal transformer pairs"):
        convert_to_parallel(torch.nn.Linear(4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [name for name in runnable_backends(interpreted=False) if name != "torch"])
def test_converted_and_patched_unet_compiles_whole(backend, seed):
    """torch.compile(fullgraph=True) of a motion UNet in Mobius form with pychop's temporal attention: no graph
    break, and eager's output and gradients."""
    unet = tiny_motion_unet(seed)
    inputs = unet_inputs()
    conversion = convert_to_parallel(unet)
    with patch_temporal_attention(unet, backend=backend):
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        out, grads = forward_backward(unet, inputs, call=lambda _, args: compiled(*args).sample)
        expected, expected_grads = forward_backward(unet, inputs)
    conversion.revert()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)

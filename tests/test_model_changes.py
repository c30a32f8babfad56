"""Models changed by lean_frozen, patch_temporal_attention and convert_to_parallel, handled as practitioners do:
whole-model torch.save / torch.load (before and after a forward), handles removed in any order and after the user
changed the model again, gradient penalties through recompute=True, a text buffer rewritten through .data, and
lean_frozen(recompute=True) before convert_to_parallel."""

import io

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from pychop.integrations.diffusers import convert_to_parallel, patch_temporal_attention  # noqa: E402
from pychop.integrations.diffusers.motion import temporal_attention_modules  # noqa: E402
from pychop.memory import lean_frozen  # noqa: E402
from tests.checks import relative_error  # noqa: E402
from tests.test_memory_diffusers import Sample, motion_unet, saved_bytes, unet_inputs  # noqa: E402
from tests.test_memory_lean import assert_same_step, training_step, video_unet  # noqa: E402


def changed_attributes(model):
    """What the tools change on the instances, by module: the types of the instance-level forwards and processors."""
    return [{key: type(value).__name__ for key, value in module.__dict__.items()
             if key in ("forward", "_conv_forward", "spatial_residual", "processor")} for module in model.modules()]


def saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


CHANGES = {
    "lean_frozen": lambda unet: lean_frozen(unet),
    "lean_frozen_recompute": lambda unet: lean_frozen(unet, recompute=True),
    "patch_temporal_attention": lambda unet: patch_temporal_attention(unet, backend="torch"),
    "convert_to_parallel": convert_to_parallel,
    "convert_then_lean": lambda unet: (convert_to_parallel(unet), lean_frozen(unet, recompute=True)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_motion_unet_survives_torch_save_and_load(change, seed):
    """Saved fresh and after a forward (which leaves caches, weak references, that must not reach the file), the
    loaded model computes the changed model's step and keeps its memory behaviour (the changes are part of it)."""
    unet = motion_unet(seed)
    inputs = unet_inputs(shared_text=True)
    CHANGES[change](unet)
    saved_and_loaded(unet)
    expected = training_step(Sample(unet), inputs)
    loaded = saved_and_loaded(unet)
    assert_same_step(training_step(Sample(loaded), inputs), expected, 1e-12)
    assert changed_attributes(loaded) == changed_attributes(unet)


@pytest.mark.slow  # a VideoUNet saved and loaded whole: seconds; the motion-UNet cases stay quick
def test_a_lean_video_unet_survives_torch_save_and_load(seed):
    model = video_unet("parallel", seed)
    inputs = model.example_inputs(2, dtype=torch.float64)
    lean_frozen(model, recompute=True)
    saved_and_loaded(model)
    expected = training_step(model, inputs)
    loaded = saved_and_loaded(model)
    assert_same_step(training_step(loaded, inputs), expected, 1e-12)
    assert saved_bytes(loaded, inputs) == saved_bytes(model, inputs)
    assert changed_attributes(loaded) == changed_attributes(model)


@pytest.mark.parametrize("order", ["creation", "reverse"])
def test_two_patches_removed_in_any_order_restore_the_originals(order, seed):
    unet = motion_unet(seed)
    originals = {name: attn.processor for name, attn in temporal_attention_modules(unet)}
    patches = [patch_temporal_attention(unet, backend="torch") for _ in range(2)]
    assert not patches[0].applied and patches[1].applied
    for patch in patches if order == "creation" else patches[::-1]:
        patch.remove()
    assert not any(patch.applied for patch in patches)
    still = [name for name, attn in temporal_attention_modules(unet) if attn.processor is not originals[name]]
    assert not still, f"{len(still)} modules still patched, e.g. {still[0]}"


def test_lean_frozen_remove_keeps_what_the_user_set_afterwards(seed):
    unet = motion_unet(seed)
    handle = lean_frozen(unet)
    assert handle.cross_attentions
    mine = AttnProcessor2_0()
    unet.set_attn_processor(mine)
    handle.remove()
    assert all(processor is mine for processor in unet.attn_processors.values())


def penalty_grads(model, inputs, params):
    """Gradients on ``params`` of a gradient penalty: the squared norm of d(loss)/d(input) (create_graph)."""
    x = inputs[0].detach().requires_grad_()
    out = model(x, *inputs[1:])
    out = out.sample if hasattr(out, "sample") else out
    grad_x, = torch.autograd.grad(out.square().mean(), x, create_graph=True)
    return torch.autograd.grad(grad_x.square().sum(), params, allow_unused=True)


@pytest.mark.parametrize("model_kind, recompute", [("video_unet", False), ("video_unet", True), ("motion_unet", True)])
def test_gradient_penalty_through_lean_frozen_is_exact(model_kind, recompute, seed):
    """Second-order gradients through lean convolutions, GEGLUs, folded cross-attention and recomputed regions
    equal the unchanged model's (the math SDPA path: the others have no double backward)."""
    if model_kind == "video_unet":
        model = video_unet("serial", seed)
        inputs = model.example_inputs(2, dtype=torch.float64)
    else:
        model = motion_unet(seed)
        inputs = unet_inputs(shared_text=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        expected = penalty_grads(model, inputs, params)
        with lean_frozen(model, recompute=recompute):
            actual = penalty_grads(model, inputs, params)
    missing = [k for k, (a, e) in enumerate(zip(actual, expected)) if (a is None) != (e is None)]
    assert not missing, f"gradients present in one and not the other: {missing[:5]}"
    for a, e in zip(actual, expected):
        if e is not None:
            assert relative_error(a, e) < 1e-10


def test_a_text_buffer_rewritten_through_data_is_read_again(seed):
    """The fold remembers whether the text's rows repeat; a buffer rewritten through .data (no version bump)
    between forwards must not reuse that answer."""
    unet = motion_unet(seed)
    x, t, shared = unet_inputs(shared_text=True)
    distinct = unet_inputs(shared_text=False)[2]
    with torch.no_grad():
        expected = unet(x, t, distinct).sample
        buffer = shared.clone()
        with lean_frozen(unet):
            unet(x, t, buffer)
            buffer.data.copy_(distinct)
            actual = unet(x, t, buffer).sample
    assert relative_error(actual, expected) < 1e-12


def test_lean_frozen_recompute_then_convert_to_parallel_says_what_to_do(seed):
    unet = motion_unet(seed)
    handle = lean_frozen(unet, recompute=True)
    with pytest.raises(ValueError, match=r"lean_frozen\(recompute=True\).*remove\(\) its handle.*convert_to_parallel "
                                         r"first"):
        convert_to_parallel(unet)
    handle.remove()
    convert_to_parallel(unet)
    lean_frozen(unet, recompute=True)

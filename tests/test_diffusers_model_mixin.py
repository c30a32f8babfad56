"""diffusers' ModelMixin surface on patched (``patch_temporal_attention``) and converted (``convert_to_parallel``)
tiny video UNets: every call the plain model accepts, the patched and converted ones accept, with the plain
model's results (the converted model's own function where it is a different one).

diffusers' model test mixins live in its repository's tests, not in the installed package, so the checks are
written here; the tiny models and inputs are those of test_diffusers_mobius.
"""

import copy
import gc
import io
import weakref

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import (  # noqa: E402
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
)
from torch.utils.checkpoint import checkpoint  # noqa: E402

from pychop.integrations.diffusers.mobius import convert_to_parallel, parallel_pairs  # noqa: E402
from pychop.integrations.diffusers.motion import TemporalAttentionProcessor, patch_temporal_attention  # noqa: E402
from tests.checks import relative_error  # noqa: E402
from tests.test_diffusers_mobius import (  # noqa: E402
    forward_backward,
    svd_inputs,
    tiny_motion_unet,
    tiny_svd_unet,
    tiny_unet_3d,
    unet_3d_inputs,
    unet_inputs,
)

MODELS = {"motion": (tiny_motion_unet, unet_inputs), "unet3d": (tiny_unet_3d, unet_3d_inputs),
          "svd": (tiny_svd_unet, svd_inputs)}
# The quick tier (scripts/test.sh --quick) runs each test on the motion UNet; the other two take seconds more each.
KINDS = [kind if kind == "motion" else pytest.param(kind, marks=pytest.mark.slow) for kind in MODELS]


def build(kind, seed, *, convert=False, patch=False):
    """The tiny model of `kind` (in eval mode: no dropout, so that runs compare exactly), converted to the
    parallel form and/or with pychop's temporal attention, and the patch (or None)."""
    unet = MODELS[kind][0](seed).eval()
    return unet, apply_pychop(unet, convert, patch)


def apply_pychop(unet, convert, patch):
    if convert:
        convert_to_parallel(unet)
    return patch_temporal_attention(unet, backend="torch") if patch else None


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def processor_types(unet):
    return {type(processor) for processor in unet.attn_processors.values()}


def assert_same_output(unet, reference, inputs):
    """Compared on float64 copies: in float32, pychop's temporal path and diffusers' sum in different orders and
    their rounding reaches about 1e-6 through a whole UNet, which would decide the comparison instead."""
    unet, reference = (copy.deepcopy(model).double() for model in (unet, reference))
    inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    torch.testing.assert_close(run(unet, inputs), run(reference, inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_processor_api_behaves_as_on_the_plain_model(kind, seed):
    plain, _ = build(kind, seed)
    unet, patch = build(kind, seed, patch=True)
    inputs = MODELS[kind][1]()
    assert unet.attn_processors.keys() == plain.attn_processors.keys()
    assert patch.applied and TemporalAttentionProcessor in processor_types(unet)
    assert_same_output(unet, plain, inputs)

    # diffusers' defaults replace pychop's processors; the patch knows, and removing it changes nothing.
    for model in (plain, unet):
        model.set_default_attn_processor()
    assert processor_types(unet) == processor_types(plain) == {AttnProcessor}
    assert not patch.applied
    patch.remove()
    assert processor_types(unet) == {AttnProcessor}
    assert torch.equal(run(unet, inputs), run(plain, inputs))

    # set_attn_processor on one patched module: the patch is no longer whole; remove() restores only the others.
    patch = patch_temporal_attention(unet, backend="torch")
    name = patch.module_names[0] + ".processor"
    replacement = AttnProcessor2_0()
    unet.set_attn_processor({**unet.attn_processors, name: replacement})
    assert not patch.applied
    patch.remove()
    assert unet.attn_processors[name] is replacement
    assert TemporalAttentionProcessor not in processor_types(unet)

    # fuse_qkv_projections: the UNets' own method sets diffusers' fused processor everywhere, the generic one
    # (UNetSpatioTemporalConditionModel) leaves these attention modules alone; unfuse puts pychop's back.
    patch = patch_temporal_attention(unet, backend="torch")
    types = processor_types(unet)
    for model in (plain, unet):
        model.fuse_qkv_projections()
    fused = processor_types(plain) == {FusedAttnProcessor2_0}
    assert processor_types(unet) == ({FusedAttnProcessor2_0} if fused else types)
    assert patch.applied != fused
    for model in (plain, unet):
        model.unfuse_qkv_projections()
    assert patch.applied and processor_types(unet) == types
    assert_same_output(unet, plain, inputs)  # pychop's processors read the fused projection where there is one
    if hasattr(plain, "set_attention_slice"):
        unet.set_attention_slice(1)
        assert processor_types(unet) == {SlicedAttnProcessor} and not patch.applied


def perturb_a_paired_temporal_module(unet):
    with torch.no_grad():
        next(parallel_pairs(unet)[0][2].parameters()).add_(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_copies_and_checkpoints_keep_the_model(kind, seed, tmp_path):
    """save_pretrained/from_pretrained, deepcopy and torch.save/torch.load of a converted and patched model."""
    plain, _ = build(kind, seed)
    unet, _ = build(kind, seed, convert=True, patch=True)
    inputs = MODELS[kind][1]()
    expected = run(unet, inputs)

    # save_pretrained stores diffusers' weights under their own names; from_pretrained loads the plain model.
    unet.save_pretrained(tmp_path)
    loaded = type(unet).from_pretrained(tmp_path)
    assert list(unet.state_dict()) == list(plain.state_dict()) == list(loaded.state_dict())
    apply_pychop(loaded, convert=True, patch=True)
    assert torch.equal(run(loaded, inputs), expected)

    copied = copy.deepcopy(unet)
    assert torch.equal(run(copied, inputs), expected)
    perturb_a_paired_temporal_module(copied)  # the copy's pairs run its own modules
    assert not torch.equal(run(copied, inputs), expected)
    assert torch.equal(run(unet, inputs), expected)

    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert TemporalAttentionProcessor in processor_types(restored)
    assert torch.equal(run(restored, inputs), expected)  # still converted: the plain model's output differs


@pytest.mark.parametrize("kind", KINDS)
def test_forward_chunking_and_bfloat16(kind, seed):
    unet, _ = build(kind, seed, convert=True, patch=True)
    inputs = MODELS[kind][1]()
    expected = run(unet, inputs)
    unet.enable_forward_chunking(chunk_size=1, dim=1)
    torch.testing.assert_close(run(unet, inputs), expected, rtol=1e-5, atol=1e-6)

    unet.to(torch.bfloat16)
    low = run(unet, [x.bfloat16() if x.is_floating_point() else x for x in inputs])
    assert low.dtype == torch.bfloat16
    assert relative_error(low.double(), expected.double()) < 3e-2


def input_references(module):
    """Weak references to the hidden states of every later call of `module`."""
    references = []
    module.register_forward_pre_hook(
        lambda _, args, kwargs: references.append(weakref.ref(kwargs.get("hidden_states", args[0] if args else None))),
        with_kwargs=True)
    return references


def assert_same_gradients(model, inputs, out, grads, calls=(1, 2)):
    """`model` (checkpointing) gives `out` and `grads`; the halves of its mid block's pair run `calls` times
    (diffusers' checkpointing runs one of them again in the backward: the mid block's motion module, or the
    spatial blocks of TransformerSpatioTemporalModel); nothing holds the pair's inputs afterwards."""
    _, spatial, temporal = next(pair for pair in parallel_pairs(model) if pair[0].startswith("mid_block"))
    references = input_references(spatial), input_references(temporal)
    out_checkpointed, grads_checkpointed = forward_backward(model, inputs)
    assert sorted(map(len, references)) == list(calls)
    gc.collect()
    assert all(reference() is None for reference in references[0] + references[1])
    assert torch.equal(out_checkpointed, out)
    assert grads_checkpointed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind, seed):
    """Checkpointing enabled after and before the conversion of a converted and patched model."""
    unet, _ = build(kind, seed, convert=True, patch=True)
    inputs = MODELS[kind][1]()
    if not unet._supports_gradient_checkpointing:  # UNet3DConditionModel: refused as on the plain model
        with pytest.raises(ValueError, match="does not support gradient checkpointing"):
            unet.enable_gradient_checkpointing()
        return
    out, grads = forward_backward(unet, inputs)
    unet.enable_gradient_checkpointing()
    assert_same_gradients(unet, inputs, out, grads)
    before, _ = build(kind, seed)
    before.enable_gradient_checkpointing()
    apply_pychop(before, convert=True, patch=True)
    assert_same_gradients(before, inputs, out, grads)
    # A checkpoint around a whole block (where torch.distributed's checkpoint wrappers put them) recomputes both
    # halves of its pair.
    unet.disable_gradient_checkpointing()
    block_forward = unet.mid_block.forward
    unet.mid_block.forward = lambda *args, **kwargs: checkpoint(block_forward, *args, use_reentrant=False, **kwargs)
    assert_same_gradients(unet, inputs, out, grads, calls=(2, 2))
    del unet.mid_block.forward
    # A checkpoint that runs one half of a pair without autograd is refused.
    unet.enable_gradient_checkpointing(lambda module, *args: checkpoint(module, *args, use_reentrant=True))
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        forward_backward(unet, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet3d", "svd"])  # test_diffusers_mobius compiles a whole motion UNet
def test_converted_and_patched_pair_compiles(kind, seed):
    """torch.compile (aot_eager, fullgraph) of the module that runs the mid block's pair (the mid block, or
    TransformerSpatioTemporalModel) with pychop's temporal attention: eager's output and gradients."""
    unet, _ = build(kind, seed, convert=True, patch=True)
    name = next(name for name, _, _ in parallel_pairs(unet) if name.startswith("mid_block"))
    block = unet.get_submodule(name.rsplit(".", 1)[0])
    captured = {}
    block.register_forward_pre_hook(lambda _, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                    with_kwargs=True)
    run(unet, MODELS[kind][1]())

    def call(module, _):
        out = module(*captured["args"], **captured["kwargs"])
        return out[0] if isinstance(out, tuple) else out  # TransformerSpatioTemporalModel: return_dict=False

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out, grads = forward_backward(compiled, None, call)
    expected, expected_grads = forward_backward(block, None, call)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert relative_error(grads[name].double(), grad.double()) < 1e-5, name

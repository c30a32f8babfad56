"""torch.compile: pychop's ops and modules compile whole (``fullgraph=True``: no graph break) and compute what
eager mode computes; the fused backends' custom operators pass ``torch.library.opcheck``."""

import pytest
import torch

from pychop.models import TINY, VideoUNet
from pychop.nn import ParallelSTBlock
from pychop.ops import attention
from tests.checks import input_count, make_inputs, op_call, runnable_backends

SHAPE = (1, 3, 10, 2, 8)  # (B, T, S, H, D)
OPS = [("parallel", dict(causal=True, grad_window=1)), ("stacked", dict(window=2)), ("spatial", {}),
       ("temporal", dict(causal=True))]
# Triton in the CPU interpreter takes seconds per compiled case: slow (the quick tier keeps cpp's).
FUSED_CPU = [pytest.param(name, marks=pytest.mark.slow) if name == "triton" else name
             for name in runnable_backends() if name != "torch"]
FUSED_MODELS = [name for name in runnable_backends(interpreted=False) if name != "torch"]
FUSED_GPU = [name for name in runnable_backends("cuda") if name != "torch"] if torch.cuda.is_available() else []


def assert_compiled_matches_eager(fn, inputs, compiler, wrt=None):
    """fn compiled whole gives eager's output, and gradients with respect to `wrt` (the inputs by default),
    exactly: the same kernels run on the same data (every fused backward is deterministic)."""
    wrt = inputs if wrt is None else wrt
    torch._dynamo.reset()  # each test's lambda is one code object: its compiles would add up to dynamo's limit
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), wrt)
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), wrt)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("spatial_path", ["sdpa", "kernel"])
@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("op,options", OPS, ids=[op for op, _ in OPS])
def test_ops_compile_whole_and_match_eager(backend, op, options, spatial_path, seed):
    if op == "temporal" and spatial_path == "kernel":
        pytest.skip("no spatial branch: runs in the sdpa case")
    inputs = make_inputs(SHAPE, torch.float32, "cpu", input_count(op), packed=True)
    assert_compiled_matches_eager(lambda *x: op_call(op, x, backend=backend, spatial_path=spatial_path, **options),
                                  inputs, "aot_eager")


@pytest.mark.parametrize("spatial_path", ["sdpa", "kernel"])
@pytest.mark.parametrize("op", ["parallel", "stacked"])
@pytest.mark.parametrize("backend", FUSED_CPU)
def test_inductor_compiles_the_parallel_op(backend, op, spatial_path, seed):
    inputs = make_inputs(SHAPE, torch.float32, "cpu")
    assert_compiled_matches_eager(
        lambda *x: op_call(op, x, backend=backend, causal=True, spatial_path=spatial_path), inputs, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_GPU)
@pytest.mark.parametrize("op,options", OPS, ids=[op for op, _ in OPS])
def test_ops_compile_whole_on_the_gpu(backend, op, options, seed):
    inputs = make_inputs((2, 8, 200, 4, 64), torch.bfloat16, "cuda", input_count(op), packed=True)
    assert_compiled_matches_eager(lambda *x: op_call(op, x, backend=backend, **options), inputs, "inductor")


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("branches", ["both", "both-stacked", "spatial", "temporal"])
def test_custom_operators_pass_opcheck(backend, branches, seed):
    """Schema, fake (meta) functions against the real outputs' shapes, dtypes and strides, and AOT dispatch,
    for both operators, on views of a packed projection."""
    views = [x.detach() for x in make_inputs(SHAPE, torch.float32, "cpu", packed=True)]
    spatial = views[:3] if branches != "temporal" else [None] * 3
    temporal = views[3:] if branches != "spatial" else [None] * 3
    options = (0.3, True, 2)  # scale, temporal_causal, temporal_window
    stacked = branches == "both-stacked"
    forward_args = (backend, False, *spatial, *temporal, *options, stacked)
    torch.library.opcheck(attention.fused_attention_forward_op, forward_args)
    out, lse_s, lse_t = attention.fused_attention_forward(*forward_args)
    backward_args = (backend, False, torch.randn_like(out), *spatial, *temporal, out, lse_s, lse_t, *options, 1,
                     stacked)
    torch.library.opcheck(attention.fused_attention_backward_op, backward_args)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_MODELS)
def test_parallel_block_and_video_unet_compile_whole(backend, seed):
    block = ParallelSTBlock(32, 2, backend=backend, temporal_causal=True)
    x = torch.randn(2, 3, 10, 32, requires_grad=True)
    assert_compiled_matches_eager(block, [x], "aot_eager", wrt=[x, *block.parameters()])
    unet = VideoUNet(TINY, "parallel", backend=backend).freeze_spatial()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert_compiled_matches_eager(unet, unet.example_inputs(), "aot_eager", wrt=trainable)


def test_recompute_projection_compiles_with_a_graph_break(seed):
    """Its saved-tensor hooks are outside what torch.compile traces: the block compiles around them."""
    block = ParallelSTBlock(32, 2, backend="auto", recompute_projection=True)
    x = torch.randn(2, 3, 10, 32, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager")
    out = compiled(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    expected = block(x)
    expected_grad, = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_one_tensor_as_several_inputs_compiles_whole(backend, seed):
    """q = k = v (self-attention on one tensor): torch.compile refuses a tensor passed twice to an autograd
    Function, so the op passes views; the gradient is the sum over the three roles, as in eager mode."""
    x = torch.randn(SHAPE, requires_grad=True)
    assert_compiled_matches_eager(lambda x: op_call("spatial", (x, x, x), backend=backend), [x], "aot_eager")
    assert_compiled_matches_eager(lambda x: op_call("parallel", (x,) * 6, backend=backend, causal=True), [x],
                                  "aot_eager")

"""Every fused backend against the float64 reference, scenario by scenario: forward and every input gradient.

One suite for all fused backends (``cpp`` on the CPU; ``triton`` on the GPU, or in its interpreter on a CPU-only
machine; ``cuda`` on the GPU), so that each meets every scenario: every temporal option, every dtype, head dims
padded or not (10 ... 256), frame and token counts off every block size, a single token, packed
projection views, six inputs of six layouts, NaN past the head dim, scores past the exponent range, a temporal
branch outweighing the saved 16-bit sum, a strided output gradient. Sizes are small and odd (the interpreter is
slow); outputs are NaN-poisoned, so an element a kernel leaves unwritten fails. The tolerance is
tests/checks.py's: at most 3x the torch path's error in the same dtype, plus a small floor (float32: 1e-6).
"""

import pytest
import torch

from benchmarks.floors import DESIGN_SHAPES
from pychop.ops import backends
from tests.checks import (
    DTYPES,
    ERROR_FACTOR,
    FLOOR,
    GRAD_NAMES,
    TEMPORAL_OPTIONS,
    assert_finite,
    check_against_float32_torch,
    check_against_reference,
    check_kernel_statistics,
    dominating_key_inputs,
    dtype_id,
    forward_backward,
    input_count,
    make_inputs,
    mixed_layout_inputs,
    nan_padded_inputs,
    op_call,
    options_id,
    reference_call,
    relative_error,
    temporal_dominated_inputs,
)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_SPATIAL_DELTA_DEFECT = ("known defect: spatial_bwd.cu takes delta_s = rowsum(dout * out) - delta_t from the "
                             "16-bit rounded sum out = o_s + o_t (cpp and triton take it from P dP)")


def fused_backends(cuda_xfail: str = None):
    """(backend, device) parameters: cpp on the CPU, triton where it runs (a gpu test where that is a GPU), cuda
    on a GPU (xfail with a reason)."""
    cuda_marks = [pytest.mark.gpu] + ([pytest.mark.xfail(strict=True, reason=cuda_xfail)] if cuda_xfail else [])
    triton_marks = [pytest.mark.gpu] if TRITON_DEVICE == "cuda" else []
    return [pytest.param(("cpp", "cpu"), id="cpp"), pytest.param(("triton", TRITON_DEVICE), id="triton",
                                                                 marks=triton_marks),
            pytest.param(("cuda", "cuda"), id="cuda", marks=cuda_marks)]


@pytest.fixture(params=fused_backends())
def fused(request):
    return request.param


def check(op, fused, shape, dtype, seed, **kwargs):
    backend, device = fused
    if kwargs.get("inputs") is not None:
        kwargs["inputs"] = [x.detach().to(device).requires_grad_() for x in kwargs["inputs"]]
    check_against_reference(op, backend, shape, dtype, device, seed, **kwargs)


@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options(fused, op, options, seed):
    check(op, fused, (2, 5, 19, 2, 24), torch.float32, seed, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op, options", [
    ("parallel", {}),
    ("parallel", {"causal": True, "grad_window": 2}),
    ("stacked", {"causal": True, "grad_window": 2}),
    ("temporal", {"window": 2, "grad_window": 1}),
    ("spatial", {}),
], ids=["parallel", "parallel-causal-grad2", "stacked-causal-grad2", "temporal-window2-grad1", "spatial"])
def test_dtypes_with_tokens_across_blocks(fused, op, options, dtype, seed):
    check(op, fused, (1, 3, 33, 2, 40), dtype, seed, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [10, 20, 40, 64, 72, 80, 96, 128, 160, 256])
def test_head_dims(fused, head_dim, dtype, seed):
    """Padded (10, 20 in 16- and 32-column tiles), split in two blocks by the Triton spatial kernels (40, 72, 80,
    96, 160: 32 + 16, 64 + 16, 64 + 16, 64 + 32, 128 + 32; padded by the temporal ones) and exact, up to the
    largest head dim, 256; 10 is not a multiple of 4."""
    check("parallel", fused, (1, 3, 7, 1, head_dim), dtype, seed, causal=True, grad_window=1)


@pytest.mark.parametrize("frames, options", [
    (1, {}),
    (1, {"causal": True, "grad_window": 1}),
    (3, {"window": 2}),
    (17, {"causal": True, "grad_window": 4}),
    (19, {"grad_window": 3}),
])
def test_frame_counts(fused, frames, options, seed):
    """T = 17 and 19 span two blocks of frames in the interpreter (16) and three of the cpp kernels (8)."""
    check("parallel", fused, (1, frames, 5, 1, 40), torch.float32, seed, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("tokens", [2, 7, 33])
def test_token_counts(fused, tokens, dtype, seed):
    check("parallel", fused, (1, 2, tokens, 2, 24), dtype, seed, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op, options", [("parallel", {"causal": True}), ("temporal", {"causal": True}),
                                         ("spatial", {})], ids=["parallel", "temporal", "spatial"])
def test_single_token(fused, op, options, dtype, seed):
    """S = 1: the spatial q/k gradients are zero in exact arithmetic, where the relative rule of
    check_against_reference divides by zero. Errors are measured against the largest reference gradient
    instead, with the same ERROR_FACTOR x torch-path error + FLOOR bound."""
    backend, device = fused
    count = input_count(op)
    inputs = make_inputs((2, 3, 1, 2, 40), dtype, device, count)
    out, dout, grads = forward_backward(lambda *x: op_call(op, x, backend=backend, **options), inputs)
    base_out, _, base = forward_backward(lambda *x: op_call(op, x, backend="torch", **options), inputs, dout)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref_out, _, reference = forward_backward(lambda *x: reference_call(op, x, **options), inputs64,
                                             dout.double())
    assert relative_error(out, ref_out) <= ERROR_FACTOR * relative_error(base_out, ref_out) + FLOOR[dtype]
    reference = [torch.zeros_like(x, dtype=torch.float64) if r is None else r for x, r in zip(inputs64, reference)]
    largest = max(r.abs().max().item() for r in reference)
    for name, actual, baseline, expected in zip(GRAD_NAMES[count], grads, base, reference):
        assert_finite(actual, name)
        error = (actual.double() - expected).abs().max().item() / largest
        base_error = (baseline.double() - expected).abs().max().item() / largest
        bound = ERROR_FACTOR * base_error + FLOOR[dtype]
        assert error <= bound, f"{name}: error {error:.3g} of the largest gradient > {bound:.3g} ({op} {dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op, options", [
    ("parallel", {"window": 2, "grad_window": 1}),
    ("stacked", {"causal": True, "grad_window": 2}),
    ("temporal", {"causal": True}),
    ("spatial", {}),
])
def test_packed_projection_views(fused, op, options, dtype, seed):
    """Strided views of one (B, T, S, n, H, D) projection: read in place, gradients land in the projection."""
    check(op, fused, (1, 3, 19, 2, 40), dtype, seed, packed=True, scale=0.3, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op, options", [("parallel", {"causal": True, "grad_window": 2}), ("stacked", {}),
                                         ("spatial", {})], ids=["parallel-causal-grad2", "stacked", "spatial"])
def test_inputs_of_different_layouts(fused, op, options, dtype, seed):
    """Every input with its own strides (contiguous, packed, permuted views): each tensor must be read with its
    own strides, never another input's."""
    shape = (2, 3, 11, 2, 24)
    inputs = mixed_layout_inputs(shape, dtype, "cpu", input_count(op))
    check(op, fused, shape, dtype, seed, inputs=inputs, **options)


@pytest.mark.parametrize("op, options", [("parallel", {"causal": True, "grad_window": 1}),
                                         ("stacked", {"window": 2})], ids=["parallel-causal-grad1", "stacked-window2"])
@pytest.mark.parametrize("head_dim", [20, 40])
def test_nothing_read_past_the_head_dim(fused, op, options, head_dim, seed):
    """Rows continue with NaN past D up to 64 columns (views of wider tensors, last stride 1): tiles padded past
    D must mask their loads."""
    shape = (1, 3, 7, 2, head_dim)
    inputs = nan_padded_inputs(shape, torch.float32, "cpu", input_count(op), width=64)
    check(op, fused, shape, torch.float32, seed, inputs=inputs, **options)


@pytest.mark.parametrize("op", ["spatial", "temporal"])
def test_scores_falling_by_more_than_the_exponent_range(fused, op, seed):
    """Each query's one dominating key scores about 200 above its others, at a different token or frame per
    query: a softmax maximum taken over part of a row (some blocks, some frames) lets exp overflow."""
    shape = (1, 3, 33, 1, 16)
    inputs = dominating_key_inputs(op, shape, torch.float32, "cpu")
    check(op, fused, shape, torch.float32, seed, inputs=inputs)


@pytest.mark.parametrize("fused_xfail", fused_backends(cuda_xfail=CUDA_SPATIAL_DELTA_DEFECT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_temporal_branch_dominating_the_saved_sum(fused_xfail, dtype, seed):
    """Summed, the backward reads only out = o_s + o_t rounded to 16 bits: the spatial backward must take the
    exact delta_s = rowsum(P dP), never the one of the rounded sum (see temporal_dominated_inputs)."""
    shape = (1, 3, 19, 1, 16)
    inputs = temporal_dominated_inputs(shape, dtype, "cpu")
    check("parallel", fused_xfail, shape, dtype, seed, inputs=inputs)


def test_strided_output_gradient(fused, seed):
    """An upstream gradient with unusual strides (last one 1) is read as it lies."""
    backend, device = fused
    inputs = make_inputs((1, 3, 9, 2, 16), torch.float32, device, packed=True)
    dout = torch.randn(1, 3, 2, 9, 16, device=device).transpose(2, 3)  # (B, T, S, H, D) view
    _, _, grads = forward_backward(lambda *x: op_call("parallel", x, backend=backend, causal=True), inputs, dout)
    _, _, expected = forward_backward(lambda *x: op_call("parallel", x, backend="torch", causal=True), inputs,
                                      dout)
    for name, actual, reference in zip(GRAD_NAMES[6], grads, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4, msg=name)


def test_kernel_interface_statistics(fused, seed):
    """forward() returns each branch's natural-log logsumexp of the scaled scores, (B, T, H, S) float32: the
    contract of the kernel interface, which the backward's own reading of them cannot check."""
    backend, device = fused
    check_kernel_statistics(backends.load(backend, torch.device(device)), device)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"causal": True, "grad_window": 1}, {"window": 8, "grad_window": 4}],
                         ids=options_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape_name", list(DESIGN_SHAPES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_benchmark_shapes_against_float32_torch(backend, shape_name, dtype, options):
    """The benchmark shapes A-F (tens of thousands of tokens per frame batch), forward and the six gradients."""
    torch.manual_seed(0)
    check_against_float32_torch(backend, DESIGN_SHAPES[shape_name], dtype, **options)

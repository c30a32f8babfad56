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
from pychop.ops import backends, sdpa_spatial
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

pytestmark = pytest.mark.numerics  # CI runs these once more on the AVX2 path (scripts/test.sh --avx2)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPATIAL_PATHS = ("sdpa", "kernel")


def fused_backends(*, quick_interpreter: bool = False, interpreted_triton: bool = True):
    """(backend, device, spatial path) parameters: cpp on the CPU, triton where it runs (a gpu test where that is
    a GPU; in the CPU interpreter, seconds per case: slow unless `quick_interpreter`, left out when
    `interpreted_triton` is False), cuda on a GPU, each with its spatial branch through SDPA's kernel and through
    its own."""
    triton_marks = [pytest.mark.gpu] if TRITON_DEVICE == "cuda" else [] if quick_interpreter else [pytest.mark.slow]
    backends = [("cpp", "cpu", [])]
    if interpreted_triton or TRITON_DEVICE == "cuda":
        backends.append(("triton", TRITON_DEVICE, triton_marks))
    backends.append(("cuda", "cuda", [pytest.mark.gpu]))
    return [pytest.param((backend, device, path), id=f"{backend}-{path}", marks=marks)
            for backend, device, marks in backends for path in SPATIAL_PATHS]


@pytest.fixture(params=fused_backends())
def fused(request):
    return request.param


QUICK_IN_THE_INTERPRETER = pytest.mark.parametrize("fused", fused_backends(quick_interpreter=True))


def one_spatial_path(fused, op="temporal"):
    """The temporal op, and what does not depend on the spatial path, runs in the sdpa case only."""
    if op == "temporal" and fused[2] == "kernel":
        pytest.skip("no spatial branch: runs in the sdpa case")


def check(op, fused, shape, dtype, seed, *, packed=False, inputs=None, **kwargs):
    """check_against_reference on the fused parameter's backend, device and spatial path (on a GPU, inputs no SDPA
    kernel takes skip the sdpa case: the kernel case covers them)."""
    backend, device, path = fused
    one_spatial_path(fused, op)
    if inputs is None:
        inputs = make_inputs(shape, dtype, device, input_count(op), packed=packed)
    inputs = [x.detach().to(device).requires_grad_() for x in inputs]
    if path == "sdpa" and op != "temporal" and sdpa_spatial.sdpa_kernel_for(*inputs[:3]) is None:
        pytest.skip("no SDPA kernel takes these inputs here")
    check_against_reference(op, backend, shape, dtype, device, seed, inputs=inputs, spatial_path=path, **kwargs)


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


@pytest.mark.parametrize("fused_compiled", fused_backends(interpreted_triton=False))
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
@pytest.mark.parametrize("options", [{"causal": True, "grad_window": 5}, {"window": 40, "grad_window": 20}, {}],
                         ids=options_id)
def test_frames_across_key_blocks(fused_compiled, op, options, seed):
    """T = 70 frames: more than one block of key frames in every fused kernel (cuda: 64; the interpreter's 16-frame
    blocks meet T = 17 and 19 above, and take minutes here), so the cuda backward runs its query kernel before the
    key kernel, with delta from out (temporal alone) or rowsum(P dP) (summed or stacked: the backward has no o_t
    of its own); with window 40, rows of a query block that attend no key of a key block."""
    check(op, fused_compiled, (1, 70, 3, 1, 16), torch.bfloat16, seed, **options)


@pytest.mark.parametrize("op, options", [
    ("temporal", {"window": 2**32 + 1}),
    ("parallel", {"window": 2**33 + 7, "grad_window": 2**32 + 2}),
], ids=["window2^32+1", "window2^33+7-grad2^32+2"])
def test_windows_past_the_int32_range(fused, op, options, seed):
    """A window of T frames or more means every frame: one past the int32 range is no window, not the low bits
    of it (2**32 + 1 narrowed to an int is 1, 2**32 + 2 is 2)."""
    check(op, fused, (1, 5, 7, 1, 16), torch.float32, seed, **options)


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
    backend, device, path = fused
    one_spatial_path(fused, op)
    count = input_count(op)
    inputs = make_inputs((2, 3, 1, 2, 40), dtype, device, count)
    out, dout, grads = forward_backward(lambda *x: op_call(op, x, backend=backend, spatial_path=path, **options),
                                        inputs)
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
@QUICK_IN_THE_INTERPRETER
def test_scores_falling_by_more_than_the_exponent_range(fused, op, seed):
    """Each query's one dominating key scores about 200 above its others, at a different token or frame per
    query: a softmax maximum taken over part of a row (some blocks, some frames) lets exp overflow."""
    shape = (1, 3, 33, 1, 16)
    inputs = dominating_key_inputs(op, shape, torch.float32, "cpu")
    check(op, fused, shape, torch.float32, seed, inputs=inputs)


SPATIAL_SCORES, TEMPORAL_SCORES = "btshd,btuhd->btshu", "btshd,bushd->bsthu"  # (q, k) -> scores of a branch


def largest_scaled_score(op, inputs, scale):
    """max |scale q . k| over the pairs each branch of `op` scores (spatial: the tokens of a frame; temporal: the
    frames of a token)."""
    pairs = {"spatial": [(0, 1, SPATIAL_SCORES)], "temporal": [(0, 1, TEMPORAL_SCORES)],
             "parallel": [(0, 1, SPATIAL_SCORES), (3, 4, TEMPORAL_SCORES)]}[op]
    return max(scale * torch.einsum(equation, inputs[i].double(), inputs[j].double()).abs().max().item()
               for i, j, equation in pairs)


@pytest.mark.parametrize("op, shape", [("spatial", (1, 2, 19, 2, 24)), ("temporal", (1, 9, 3, 2, 40)),
                                       ("parallel", (1, 5, 7, 1, 24))], ids=["spatial", "temporal", "parallel"])
def test_saturated_scores(fused, op, shape, seed):
    """Scores in the hundreds (scale 30, float32): each softmax nearly one-hot. A backward recomputes the
    probabilities from a float32 logsumexp, so a row sums to 1 only within its rounding (about 1e-7 |lse|), and
    delta = sum_j p dp must be divided by that sum: undivided, ds = p (dp - delta) of a query's dominating key is
    the rounding times dp instead of about 0, and the gradients erred 10-100 times the torch path's error. The
    floor adds what rounding one float32 score costs every path (a unit roundoff of the largest |scale q . k|),
    which the torch path's error can miss by luck of its evaluation order."""
    backend, device, _ = fused
    inputs = make_inputs(shape, torch.float32, device, input_count(op))
    floor = FLOOR[torch.float32] + 2.0 ** -24 * largest_scaled_score(op, inputs, 30.0)
    check(op, fused, shape, torch.float32, seed, inputs=inputs, scale=30.0, floor=floor)


@pytest.mark.parametrize("tokens", [19, 70], ids=["one-key-block", "key-blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_temporal_branch_dominating_the_saved_sum(fused, dtype, tokens, seed):
    """Summed, the backward reads only out = o_s + o_t rounded to 16 bits: the spatial backward must take the
    exact delta_s = rowsum(P dP), never the one of the rounded sum (see temporal_dominated_inputs). S = 70 spans
    several key blocks of every fused kernel (cuda: delta_s from o_s recomputed in float32; S = 19: in the key
    kernel)."""
    shape = (1, 3, tokens, 1, 16)
    inputs = temporal_dominated_inputs(shape, dtype, "cpu")
    check("parallel", fused, shape, dtype, seed, inputs=inputs)


@QUICK_IN_THE_INTERPRETER
@pytest.mark.parametrize("op", ["parallel", "stacked"])
def test_strided_output_gradient(fused, op, seed):
    """An upstream gradient with unusual strides (last one 1) is read as it lies."""
    backend, device, path = fused
    inputs = make_inputs((1, 3, 9, 2, 16), torch.float32, device, packed=True)
    dout = torch.randn(1, 3, 2, 9, *(2,) if op == "stacked" else (), 16, device=device).transpose(2, 3)
    _, _, grads = forward_backward(lambda *x: op_call(op, x, backend=backend, causal=True, spatial_path=path), inputs,
                                   dout)
    _, _, expected = forward_backward(lambda *x: op_call(op, x, backend="torch", causal=True), inputs, dout)
    for name, actual, reference in zip(GRAD_NAMES[6], grads, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4, msg=name)


@QUICK_IN_THE_INTERPRETER
def test_kernel_interface_statistics(fused, seed):
    """forward() returns each branch's natural-log logsumexp of the scaled scores, (B, T, H, S) float32: the
    contract of the kernel interface, which the backward's own reading of them cannot check."""
    backend, device, _ = fused
    one_spatial_path(fused)
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

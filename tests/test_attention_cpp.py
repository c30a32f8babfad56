"""The "cpp" backend (pychop._C's CPU kernels) against the float64 reference: every op and temporal option,
odd shapes, float32 / bfloat16 / float16, packed views. The "cuda" backend reuses these cases on the GPU."""

import pytest
import torch

import pychop
from pychop.ops import backends
from tests.checks import (TEMPORAL_OPTIONS, check_against_reference, check_kernel_statistics,
                          dominating_key_inputs, input_count, mixed_layout_inputs, nan_padded_inputs, options_id,
                          temporal_dominated_inputs)


# (B, T, S, H, D): S off every block size, T in {1, 3, 17}, D in {40, 64, 80, 128}.
ODD_SHAPES = [(1, 1, 7, 1, 40), (2, 3, 70, 2, 64), (1, 17, 5, 1, 80), (1, 3, 33, 2, 128)]
SMALL_SHAPE = (2, 5, 19, 2, 40)
LOW_PRECISION = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    try:
        backends.load("cpp", torch.device("cpu"))
    except pychop.BackendUnavailable as error:
        pytest.fail(f"the cpp backend must build on this machine: {error}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options(op, options, dtype, seed):
    check_against_reference(op, "cpp", SMALL_SHAPE, dtype, "cpu", seed, **options)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("op", ["parallel", "spatial"])
def test_odd_shapes(op, shape, dtype, seed):
    options = dict(causal=True, grad_window=2) if op == "parallel" else {}
    check_against_reference(op, "cpp", shape, dtype, "cpu", seed, **options)


@pytest.mark.parametrize("options", [{}, {"causal": True, "grad_window": 3}, {"window": 5, "grad_window": 2}],
                         ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "temporal"])
def test_temporal_tiles_with_padding(op, options, seed):
    """The temporal pass pads frames and head dim to multiples of 8: T = 19 spans three blocks of query frames,
    with masks across their boundaries; D = 20 ends in a partial vector."""
    check_against_reference(op, "cpp", (1, 19, 3, 2, 20), torch.float32, "cpu", seed, **options)


@pytest.mark.parametrize("op", ["parallel", "temporal", "spatial"])
def test_float16(op, seed):
    options = {} if op == "spatial" else dict(window=2, grad_window=1)
    check_against_reference(op, "cpp", (1, 4, 21, 2, 64), torch.float16, "cpu", seed, **options)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", ["parallel", "stacked"])
def test_packed_views_and_scale(op, dtype, seed):
    check_against_reference(op, "cpp", (2, 4, 23, 3, 40), dtype, "cpu", seed, packed=True, scale=0.3,
                            causal=True, grad_window=2)


def test_matches_torch_backend_at_a_spatial_block_boundary(seed):
    """Rows on both sides of the 64-row query block and the last partial block."""
    x = [torch.randn(1, 2, 130, 2, 32) for _ in range(6)]
    torch.testing.assert_close(pychop.parallel_st_attention(*x, backend="cpp"),
                               pychop.parallel_st_attention(*x, backend="torch"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", ["parallel", "spatial"])
def test_gradients_across_backward_query_blocks(op, dtype, seed):
    """S = 260: two whole 128-row backward query blocks and a partial one, whose dK, dV add up across blocks."""
    check_against_reference(op, "cpp", (1, 2, 260, 1, 16), dtype, "cpu", seed)


@pytest.mark.parametrize("op", ["spatial", "temporal"])
def test_scores_falling_by_more_than_the_exponent_range(op, seed):
    """Each query's one dominating key scores about 200 above its others, at a different token or frame per
    query: a softmax maximum taken over part of a row (some lanes, some frames) lets exp overflow."""
    shape = (1, 3, 33, 1, 16)
    inputs = dominating_key_inputs(op, shape, torch.float32, "cpu")
    check_against_reference(op, "cpp", shape, torch.float32, "cpu", seed, inputs=inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_temporal_branch_dominating_the_saved_sum(dtype, seed):
    """The spatial backward takes delta_s from its own rows of P and dP, never from the rounded 16-bit sum."""
    shape = (1, 3, 19, 1, 16)
    inputs = temporal_dominated_inputs(shape, dtype, "cpu")
    check_against_reference("parallel", "cpp", shape, dtype, "cpu", seed, inputs=inputs)


@pytest.mark.parametrize("op, options", [("parallel", {"causal": True, "grad_window": 1}),
                                         ("stacked", {"window": 2})], ids=["parallel-causal-grad1", "stacked-window2"])
@pytest.mark.parametrize("head_dim", [20, 40])
def test_nothing_read_past_the_head_dim(op, options, head_dim, seed):
    """Rows continue with NaN past D up to 64 columns (views of wider tensors, last stride 1): the temporal tiles
    run over D padded to 8 (20 -> 24) and float32 rows are read in place by the spatial gemms."""
    shape = (1, 3, 7, 2, head_dim)
    inputs = nan_padded_inputs(shape, torch.float32, "cpu", input_count(op), width=64)
    check_against_reference(op, "cpp", shape, torch.float32, "cpu", seed, inputs=inputs, **options)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op, options", [("parallel", {"causal": True, "grad_window": 2}), ("stacked", {}),
                                         ("spatial", {})], ids=["parallel-causal-grad2", "stacked", "spatial"])
def test_inputs_of_different_layouts(op, options, dtype, seed):
    """Every input with its own strides (contiguous, packed, permuted views; the output gradient of the stacked
    op is a view too): each tensor must be read with its own strides, never another input's."""
    shape = (2, 3, 11, 2, 24)
    inputs = mixed_layout_inputs(shape, dtype, "cpu", input_count(op))
    check_against_reference(op, "cpp", shape, dtype, "cpu", seed, inputs=inputs, **options)


@pytest.mark.parametrize("shape", [(2, 3, 5, 1, 10), (1, 8, 4000, 1, 10)], ids=str)
def test_head_dim_not_a_multiple_of_4(shape, seed):
    """D = 10 (every other test's D is a multiple of 4): float32 rows written by 4-wide streaming stores would run
    2 columns into the next token's row. Within one thread that row is written after and the overrun undone;
    with S = 4000 the temporal backward runs on two threads, and the row after the last of one thread's run of
    tokens belongs to the other thread, which has written it already."""
    check_against_reference("temporal", "cpp", shape, torch.float32, "cpu", seed, causal=True)


def test_kernel_interface_statistics(seed):
    """forward() returns each branch's natural-log logsumexp of the scaled scores, (B, T, H, S) float32: the
    contract of the kernel interface, which the backward's own reading of them cannot check."""
    check_kernel_statistics(backends.load("cpp", torch.device("cpu")), "cpu")


@pytest.mark.parametrize("op, options", [("parallel", {"causal": True}), ("stacked", {"window": 2, "grad_window": 1})],
                         ids=["parallel-causal", "stacked-window2-grad1"])
def test_float32_as_accurate_as_torch(op, options, seed):
    """float32 within 3x the torch path's own error (about 1e-7) plus 1e-6, not the usual 2e-5 floor: the
    hand-written exp and the reductions must be accurate to float32, not merely close."""
    check_against_reference(op, "cpp", (1, 3, 33, 2, 40), torch.float32, "cpu", seed, floor=1e-6, **options)


def test_auto_picks_cpp_on_cpu():
    assert backends.resolve("auto", torch.device("cpu")) == "cpp"

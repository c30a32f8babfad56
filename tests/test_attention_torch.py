"""The torch backend defines the semantics: hold it against the float64 loop-level reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pychop
from tests.checks import (
    DEVICES,
    GRAD_NAMES,
    TEMPORAL_OPTIONS,
    TOLERANCE,
    forward_backward,
    input_count,
    make_inputs,
    op_call,
    options_id,
    reference_call,
    relative_error,
)

pytestmark = pytest.mark.numerics  # CI runs these once more on the AVX2 path (scripts/test.sh --avx2)


def check_torch_backend(op, shape, dtype, device, seed, packed=False, **options):
    count = input_count(op)
    inputs = make_inputs(shape, dtype, device, count, packed=packed)
    out, dout, grads = forward_backward(lambda *x: op_call(op, x, backend="torch", **options), inputs)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref, _, ref_grads = forward_backward(lambda *x: reference_call(op, x, **options), inputs64, dout.double())
    for name, actual, expected in zip(("out",) + GRAD_NAMES[count], (out, *grads), (ref, *ref_grads)):
        expected = torch.zeros_like(actual, dtype=torch.float64) if expected is None else expected
        error = relative_error(actual, expected)
        assert error <= TOLERANCE[dtype], f"{name}: {error:.3g} > {TOLERANCE[dtype]:g} ({op} {options} seed={seed})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options_float64(op, options, device, seed):
    check_torch_backend(op, (2, 5, 6, 2, 8), torch.float64, device, seed, **options)


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_float64(device, seed):
    check_torch_backend("spatial", (2, 3, 7, 2, 8), torch.float64, device, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype, device, seed):
    check_torch_backend("parallel", (1, 4, 9, 2, 16), dtype, device, seed, causal=True, grad_window=2)


def test_packed_projection_views(seed):
    check_torch_backend("parallel", (1, 3, 5, 2, 8), torch.float64, "cpu", seed, packed=True, window=2)


@given(B=st.integers(1, 2), T=st.integers(1, 6), S=st.integers(1, 9), H=st.integers(1, 3),
       D=st.sampled_from([1, 3, 8, 20]), causal=st.booleans(), window=st.none() | st.integers(1, 7),
       grad_window=st.none() | st.integers(1, 7))
def test_fuzz_shapes_and_options(seed, B, T, S, H, D, causal, window, grad_window):
    check_torch_backend("parallel", (B, T, S, H, D), torch.float64, "cpu", seed, causal=causal,
                        window=window, grad_window=grad_window)


def test_grad_window_leaves_forward_unchanged(seed):
    inputs = make_inputs((1, 6, 4, 2, 8), torch.float64, "cpu")
    plain = pychop.parallel_st_attention(*inputs, temporal_causal=True, backend="torch")
    chopped = pychop.parallel_st_attention(*inputs, temporal_causal=True, temporal_grad_window=1,
                                           backend="torch")
    torch.testing.assert_close(chopped, plain, rtol=1e-12, atol=1e-12)


def test_grad_window_cuts_gradient_to_old_frames(seed):
    """With grad window 1, the loss at the last frame sends no gradient to earlier temporal keys/values."""
    q, k, v = make_inputs((1, 5, 3, 1, 4), torch.float64, "cpu", 3)
    out = pychop.temporal_attention(q, k, v, causal=True, grad_window=1, backend="torch")
    dk, dv, dq = torch.autograd.grad(out[:, -1].sum(), (k, v, q))
    assert dk[:, :-1].abs().max() == 0 and dv[:, :-1].abs().max() == 0
    assert dk[:, -1].abs().max() > 0 and dq[:, -1].abs().max() > 0
    full_dk, = torch.autograd.grad(pychop.temporal_attention(q, k, v, causal=True, backend="torch")[:, -1].sum(), k)
    assert full_dk[:, :-1].abs().max() > 0


def test_wide_grad_window_is_full_backprop(seed):
    inputs = make_inputs((1, 4, 3, 2, 8), torch.float64, "cpu", 3)
    dout = torch.randn(1, 4, 3, 2, 8, dtype=torch.float64)
    _, _, full = forward_backward(lambda *x: pychop.temporal_attention(*x, causal=True, backend="torch"),
                                  inputs, dout)
    _, _, wide = forward_backward(lambda *x: pychop.temporal_attention(*x, causal=True, grad_window=4,
                                                                       backend="torch"), inputs, dout)
    for a, b in zip(full, wide):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_single_frame(seed):
    """T = 1: the temporal branch attends to the frame itself, so it returns v_t."""
    q, k, v = make_inputs((2, 1, 5, 2, 8), torch.float64, "cpu", 3)
    out = pychop.temporal_attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(out, v.detach(), rtol=1e-12, atol=1e-12)

"""Triton's CPU interpreter as kernels/interpreter_compat.py patches it: tl.dot rounds once and gives the same
bits for either operand order on every CPU (numpy's own matmul does not: on AVX2, OpenBLAS's Haswell kernels give
A @ B.T and (B @ A.T).T a few ulps apart), which the attention backward kernels' recomputed scores rely on."""

import numpy
import pytest
import torch
import triton
import triton.language as tl

from kernels.interpreter_compat import ordered_dot
from kernels.tiles import interpreting

pytestmark = pytest.mark.numerics


@triton.jit
def _both_orders_kernel(A, B, AB, BA, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rows_m, rows_n, cols = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rows_m[:, None] * K + cols[None, :])
    b = tl.load(B + rows_n[:, None] * K + cols[None, :])
    tl.store(AB + rows_m[:, None] * N + rows_n[None, :], tl.dot(a, tl.trans(b), input_precision="ieee"))
    tl.store(BA + rows_n[:, None] * M + rows_m[None, :], tl.dot(b, tl.trans(a), input_precision="ieee"))


def correctly_rounded(actual, a, b):
    """|actual - a @ b.T| within half a float32 ulp of `actual`, plus the float64 sum's own rounding."""
    exact = a.double() @ b.double().T
    slack = a.shape[-1] * 2.0 ** -52 * (a.double().abs() @ b.double().abs().T)
    ulp = torch.from_numpy(numpy.spacing(actual.abs().numpy())).double()
    return bool(((actual.double() - exact).abs() <= ulp / 2 + slack).all())


@pytest.mark.skipif(not interpreting(), reason="runs Triton's CPU interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dot_is_the_same_for_either_operand_order(dtype, seed):
    """Scores as the exponent-range test makes them (|q . k| ~ 400, 16 columns): tl.dot(a, b.T) equals
    tl.dot(b, a.T).T bit for bit, and both are the correctly rounded float32 of the exact product."""
    M, N, K = 16, 32, 16
    offset = torch.zeros(K)
    offset[0] = 20
    a = (torch.randn(M, K) + offset).to(dtype)
    b = (torch.randn(N, K) + offset).to(dtype)
    ab, ba = torch.empty(M, N), torch.empty(N, M)
    _both_orders_kernel[(1,)](a, b, ab, ba, M=M, N=N, K=K)
    assert torch.equal(ab, ba.T), f"largest difference {(ab - ba.T).abs().max():.3g} (seed={seed})"
    assert correctly_rounded(ab, a.float(), b.float()), f"seed={seed}"


def test_ordered_dot_batched(seed):
    """Batched (..., M, K) @ (..., K, N) plus an accumulator, as tl.dot's 3-D form."""
    a, b = torch.randn(3, 5, 16).numpy(), torch.randn(3, 16, 7).numpy()
    acc = torch.randn(3, 5, 7).numpy()
    result = ordered_dot(a, b, acc)
    assert result.dtype == numpy.float32 and result.shape == (3, 5, 7)
    expected = (a.astype(numpy.float64) @ b.astype(numpy.float64) + acc).astype(numpy.float32)
    numpy.testing.assert_allclose(result, expected, rtol=2 ** -23, atol=1e-6, err_msg=f"seed={seed}")

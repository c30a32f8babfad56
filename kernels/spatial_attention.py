"""Triton kernels of the spatial branch: flash attention over the S tokens of each frame, on (B, T, S, H, D).

One program per (frame t, block of tokens, batch * head), frames fastest. Tensors are read where they lie
(any strides, last one 1). Launchers:

    spatial_forward(q, k, v, out, *, scale, add_to_out) -> lse (B, T, H, S) float32
        writes o_s into `out` (B, T, S, H, D); with add_to_out, out already holds o_t and gets o_s + o_t
        (o_s rounded to the output dtype first, as the unfused path adds two rounded outputs).
    spatial_backward(dout, q, k, v, out, lse, *, scale, delta_t) -> (dq, dk, dv), contiguous
        `out` is what the forward wrote; with `delta_t` (the temporal branch's rowsum(P dP), float32
        (B, T, H, S)) it holds o_s + o_t and delta_s = rowsum(dO * out) - delta_t.

Kernels: ``_spatial_forward_kernel`` (online softmax, tl.dot, log2 units),
``_spatial_backward_query_kernel`` (FlashAttention-2's dq loop; it also accumulates the exact
delta_s = sum_j p dp and, when `out` holds the sum, corrects dq for that sum's rounding through sum_j p k) and
``_spatial_backward_key_kernel`` (FlashAttention-2's dk/dv loop over the frame's query blocks, reading the exact
delta_s). Nothing quadratic is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .outputs import new_output
from .tiles import (
    LN2,
    LOG2E,
    bounded_exponent,
    dot_constants,
    head_dim_block,
    head_dim_bucket,
    interpreting,
    mma,
    row_statistics,
    strides4,
)


@triton.jit
def _frame_tile(X, b, t, h, offs_s, offs_d, stride_b, stride_t, stride_s, stride_h):
    """Pointers to tokens `offs_s` x columns `offs_d` of X[b, t, :, h, :], int64 offsets (a view's token stride
    may span other dimensions: S * stride_s can pass 2^31)."""
    base = tl.cast(b, tl.int64) * stride_b + tl.cast(t, tl.int64) * stride_t + tl.cast(h, tl.int64) * stride_h
    return X + base + (tl.cast(offs_s, tl.int64)[:, None] * stride_s + offs_d[None, :])


@triton.jit
def _row_offsets(b, t, h, offs_s, T, H, S):
    """Offsets of tokens `offs_s` of (b, t, h) in a contiguous (B, T, H, S) row-statistics tensor."""
    return ((tl.cast(b, tl.int64) * T + t) * H + h) * S + offs_s


@triton.jit
def _program_block(S, H, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (t, b, h), its BLOCK tokens, the head dim's columns, the token mask and the token x column
    mask. Grid (T, blocks of S, B * H)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2) // H
    h = tl.program_id(2) % H
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < S
    return t, b, h, offs, offs_d, ok, ok[:, None] & (offs_d[None, :] < D)


@triton.jit
def _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
               stride_v_b, stride_v_t, stride_v_s, stride_v_h, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys and values of tokens start_n .. start_n + BLOCK_N of (b, t, h), and which of them exist."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < S
    kv_ok = key_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(_frame_tile(K, b, t, h, offs_n, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h),
                mask=kv_ok, other=0.0)
    v = tl.load(_frame_tile(V, b, t, h, offs_n, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h),
                mask=kv_ok, other=0.0)
    return key_ok, k, v


@triton.jit
def _spatial_forward_kernel(
        Q, K, V, Out, Lse,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_o_b, stride_o_t, stride_o_s, stride_o_h,
        T, S, H, scale, D: tl.constexpr, ADD_TO_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_m, offs_d, row_ok, tile_ok = _program_block(S, H, D, BLOCK_M, BLOCK_D)
    qk_scale = scale * LOG2E
    q = tl.load(_frame_tile(Q, b, t, h, offs_m, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h),
                mask=tile_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        key_ok, k, v = _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                  stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    tl.store(Lse + _row_offsets(b, t, h, offs_m, T, H, S), (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
    out_tile = _frame_tile(Out, b, t, h, offs_m, offs_d, stride_o_b, stride_o_t, stride_o_s, stride_o_h)
    out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    if ADD_TO_OUT:  # out holds o_t: one read-modify-write adds the two rounded branches
        out = (out.to(tl.float32) + tl.load(out_tile, mask=tile_ok, other=0.0).to(tl.float32))
    tl.store(out_tile, out.to(Out.dtype.element_ty), mask=tile_ok)


@triton.jit
def _spatial_backward_query_kernel(
        Q, K, V, Out, DOut, Lse, DeltaT, DeltaS, DQ,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_o_b, stride_o_t, stride_o_s, stride_o_h,
        stride_do_b, stride_do_t, stride_do_s, stride_do_h,
        stride_g_b, stride_g_t, stride_g_s, stride_g_h,
        T, S, H, scale, D: tl.constexpr, OUT_IS_SUM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_m, offs_d, row_ok, tile_ok = _program_block(S, H, D, BLOCK_M, BLOCK_D)
    qk_scale = scale * LOG2E
    stats = _row_offsets(b, t, h, offs_m, T, H, S)
    o = tl.load(_frame_tile(Out, b, t, h, offs_m, offs_d, stride_o_b, stride_o_t, stride_o_s, stride_o_h),
                mask=tile_ok, other=0.0)
    do = tl.load(_frame_tile(DOut, b, t, h, offs_m, offs_d, stride_do_b, stride_do_t, stride_do_s, stride_do_h),
                 mask=tile_ok, other=0.0)
    # delta = rowsum(dO * o_s), first from the saved output (rounded to its dtype; minus delta_t when it holds
    # the sum); the exact value, sum_j p dp, is accumulated on the way and goes to the key kernel. With both
    # branches summed the rounding of the saved *sum* would dominate dq's error, so dq is corrected through
    # sum_j p k.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if OUT_IS_SUM:
        delta -= tl.load(DeltaT + stats, mask=row_ok, other=0.0)
    delta_exact = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    q = tl.load(_frame_tile(Q, b, t, h, offs_m, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h),
                mask=tile_ok, other=0.0)
    lse = tl.load(Lse + stats, mask=row_ok, other=0.0) * LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        key_ok, k, v = _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                  stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
        p = tl.where(key_ok[None, :], tl.exp2(bounded_exponent(s - lse[:, None], 1.0)), 0.0)
        dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
        p_dp = p * dp
        delta_exact += tl.sum(p_dp, 1)
        ds = p_dp - p * delta[:, None]
        dq += mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
        if OUT_IS_SUM:
            pk += mma(p.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    if OUT_IS_SUM:
        dq += (delta - delta_exact)[:, None] * pk
    tl.store(DeltaS + stats, delta_exact, mask=row_ok)
    tl.store(_frame_tile(DQ, b, t, h, offs_m, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h),
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _spatial_backward_key_kernel(
        Q, K, V, DOut, Lse, DeltaS, DK, DV,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_do_b, stride_do_t, stride_do_s, stride_do_h,
        stride_g_b, stride_g_t, stride_g_s, stride_g_h,
        T, S, H, scale, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_n, offs_d, key_ok, tile_ok = _program_block(S, H, D, BLOCK_N, BLOCK_D)
    qk_scale = scale * LOG2E
    k = tl.load(_frame_tile(K, b, t, h, offs_n, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h),
                mask=tile_ok, other=0.0)
    v = tl.load(_frame_tile(V, b, t, h, offs_n, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h),
                mask=tile_ok, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        q_ok = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(_frame_tile(Q, b, t, h, offs_m, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h),
                    mask=q_ok, other=0.0)
        do = tl.load(_frame_tile(DOut, b, t, h, offs_m, offs_d, stride_do_b, stride_do_t, stride_do_s,
                                 stride_do_h), mask=q_ok, other=0.0)
        stats = _row_offsets(b, t, h, offs_m, T, H, S)
        lse = tl.load(Lse + stats, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DeltaS + stats, mask=row_ok, other=0.0)
        s_t = mma(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (keys, queries)
        p_t = tl.where(row_ok[None, :], tl.exp2(bounded_exponent(s_t - lse[None, :], 1.0)), 0.0)
        dv += mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
        dp_t = mma(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += mma(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)
    tl.store(_frame_tile(DK, b, t, h, offs_n, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h),
             (dk * scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(_frame_tile(DV, b, t, h, offs_n, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h),
             dv.to(DV.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch table: keyed on the head-dim bucket and the dtype (no autotuning).
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpatialConfig:
    block_m: int  # query tokens per program (forward, query kernel); query tokens per step (key kernel)
    block_n: int  # key tokens per step (forward, query kernel); key tokens per program (key kernel)
    num_warps: int
    num_stages: int


# (head-dim bucket, 2-byte dtype?) -> (forward, backward query kernel, backward key kernel). Hopper-oriented:
# 128-row query tiles forward, FlashAttention-2's small-query / large-key split backward at D <= 64, square
# 64-tiles at D = 128, smaller tiles at D = 256 and in float32. tests/test_kernel_compilation.py compiles every
# entry for sm_90 and holds it to its shared memory and register budget.
GPU_CONFIGS = {
    (64, True): (SpatialConfig(128, 64, 8, 3), SpatialConfig(64, 64, 4, 3), SpatialConfig(32, 128, 8, 3)),
    (128, True): (SpatialConfig(128, 64, 8, 2), SpatialConfig(64, 64, 8, 2), SpatialConfig(64, 64, 8, 2)),
    (256, True): (SpatialConfig(64, 32, 8, 2), SpatialConfig(32, 32, 8, 1), SpatialConfig(32, 32, 8, 1)),
    (64, False): (SpatialConfig(32, 64, 8, 2), SpatialConfig(64, 32, 8, 2), SpatialConfig(32, 32, 8, 2)),
    (128, False): (SpatialConfig(32, 32, 8, 2), SpatialConfig(32, 16, 8, 2), SpatialConfig(16, 32, 8, 1)),
    (256, False): (SpatialConfig(32, 16, 8, 1), SpatialConfig(16, 16, 8, 1), SpatialConfig(16, 16, 8, 1)),
}
# Triton's CPU interpreter: small tiles (S = 33 spans three blocks); warps and stages are ignored.
INTERPRETER_CONFIG = SpatialConfig(16, 16, 1, 1)

KERNELS = (_spatial_forward_kernel, _spatial_backward_query_kernel, _spatial_backward_key_kernel)


def configs(head_dim: int, dtype: torch.dtype):
    """(forward, backward query, backward key) launch settings for `head_dim` and `dtype`."""
    if interpreting():
        return (INTERPRETER_CONFIG,) * 3
    return GPU_CONFIGS[(head_dim_bucket(head_dim), dtype.itemsize == 2)]


# ----------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------

def spatial_forward(q, k, v, out, *, scale, add_to_out):
    B, T, S, H, D = q.shape
    lse = row_statistics(B, T, S, H, q.device)
    config = configs(D, q.dtype)[0]
    _spatial_forward_kernel[(T, triton.cdiv(S, config.block_m), B * H)](
        q, k, v, out, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(out),
        T, S, H, scale, D=D, ADD_TO_OUT=add_to_out, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_D=head_dim_block(D), **dot_constants(q.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages)
    return lse


def spatial_backward(dout, q, k, v, out, lse, *, scale, delta_t):
    B, T, S, H, D = q.shape
    dq, dk, dv = (new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta_s = row_statistics(B, T, S, H, q.device)
    _, query_config, key_config = configs(D, q.dtype)
    common = dict(D=D, BLOCK_D=head_dim_block(D), **dot_constants(q.dtype))
    _spatial_backward_query_kernel[(T, triton.cdiv(S, query_config.block_m), B * H)](
        q, k, v, out, dout, lse, delta_t, delta_s, dq,
        *strides4(q), *strides4(k), *strides4(v), *strides4(out), *strides4(dout), *strides4(dq),
        T, S, H, scale, OUT_IS_SUM=delta_t is not None, BLOCK_M=query_config.block_m,
        BLOCK_N=query_config.block_n, num_warps=query_config.num_warps, num_stages=query_config.num_stages,
        **common)
    _spatial_backward_key_kernel[(T, triton.cdiv(S, key_config.block_n), B * H)](
        q, k, v, dout, lse, delta_s, dk, dv,
        *strides4(q), *strides4(k), *strides4(v), *strides4(dout), *strides4(dk),
        T, S, H, scale, BLOCK_M=key_config.block_m, BLOCK_N=key_config.block_n,
        num_warps=key_config.num_warps, num_stages=key_config.num_stages, **common)
    return dq, dk, dv

"""Triton kernels of the spatial branch: flash attention over the S tokens of each frame, on (B, T, S, H, D).

One program per (frame t, block of tokens, batch * head), frames fastest. Tensors are read where they lie
(any strides, last one 1); when the host proves every row 16-byte aligned (``tiles.alignment``: a packed
projection's head stride D = 40 or 72 is no multiple of 16 elements, but 40 bf16 are 80 bytes) the kernels are
told so and load 16-byte vectors. A head dim that is no power of two is compiled in two blocks where that is
narrower than padding it (``tiles.head_dim_split``: 40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32), every product
over the head dim then a product per block; a launch-table entry may pad instead (``SpatialConfig.split``).
Launchers:

    spatial_forward(q, k, v, out, *, scale, add_to_out) -> lse (B, T, H, S) float32
        writes o_s into `out` (B, T, S, H, D); with add_to_out, out already holds o_t and gets o_s + o_t
        (o_s rounded to the output dtype first, as the unfused path adds two rounded outputs).
    spatial_backward(dout, q, k, v, out, lse, *, scale, delta_t) -> (dq, dk, dv), contiguous
        `out` is what the forward wrote; with `delta_t` (the temporal branch's rowsum(P dP), float32
        (B, T, H, S)) it holds o_s + o_t and delta_s = rowsum(dO * out) - delta_t.

Kernels, with their matrix products per pair of a query block and a key block (docs/design.md, section 3):
``_spatial_forward_kernel`` (online softmax; Q K^T, P V), ``_spatial_backward_query_kernel`` (FlashAttention-2's
dq loop; Q K^T, dO V^T, dS K; it also accumulates the exact delta_s = sum_j p dp / sum_j p and, when `out` holds
the sum, corrects dq for that sum's rounding through sum_j p k, a fourth product, P K) and
``_spatial_backward_key_kernel`` (FlashAttention-2's dk/dv loop over the frame's query blocks, reading the exact
delta_s; K Q^T, P^T dO, V dO^T, dS^T Q). Backward: 7 products, 8 with a summed output. Nothing quadratic is
stored.

Scores are in natural-log units, as the logsumexp the forward returns: the backward's p = exp(s - lse) subtracts
before it exponentiates, so a query's dominating key gets p = 1 exactly when the forward's l is 1. (Scores in log2
units, FlashAttention's exp2 form, saved the forward one multiply per score but made the backward convert the
saved lse twice, ln 2 there and back, a few float32 roundings of |lse|: at scores of a few hundred, errors in dv
several times the torch path's.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .outputs import new_output
from .tiles import (
    LN2,
    alignment,
    bounded_exponent,
    dot_constants,
    head_dim_block,
    head_dim_bucket,
    head_dim_split,
    launch_family,
    mma,
    row_statistics,
    strides4,
)


@triton.jit
def _frame_tile(X, b, t, h, offs_s, offs_d, stride_b, stride_t, stride_s, stride_h, ALIGN: tl.constexpr):
    """Pointers to tokens `offs_s` x columns `offs_d` of X[b, t, :, h, :], int64 offsets (a view's token stride
    may span other dimensions: S * stride_s can pass 2^31). Each row starts at a multiple of ALIGN elements
    (the host checked it: ``tiles.alignment``), so ALIGN = 16 bytes makes the loads 16-byte vectors."""
    base = tl.cast(b, tl.int64) * stride_b + tl.cast(t, tl.int64) * stride_t + tl.cast(h, tl.int64) * stride_h
    rows = tl.multiple_of(base + tl.cast(offs_s, tl.int64) * stride_s, ALIGN)
    return X + rows[:, None] + offs_d[None, :]


@triton.jit
def _row_offsets(b, t, h, offs_s, T, H, S):
    """Offsets of tokens `offs_s` of (b, t, h) in a contiguous (B, T, H, S) row-statistics tensor."""
    return ((tl.cast(b, tl.int64) * T + t) * H + h) * S + offs_s


@triton.jit
def _program_block(S, H, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr):
    """This program's (t, b, h), its BLOCK tokens and which exist, the head dim's first BLOCK_D columns and its
    tail's TAIL_D (BLOCK_D ... BLOCK_D + 16 without a tail, unused). Grid (T, blocks of S, B * H)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2) // H
    h = tl.program_id(2) % H
    return t, b, h, offs, offs < S, tl.arange(0, BLOCK_D), BLOCK_D + tl.arange(0, TAIL_D if TAIL_D > 0 else 16)


@triton.jit
def _load_tile(X, b, t, h, offs_s, ok, offs_d, stride_b, stride_t, stride_s, stride_h, D: tl.constexpr,
               ALIGN: tl.constexpr):
    """X[b, t, offs_s, h, offs_d], zero where a token or a column (>= D) does not exist."""
    return tl.load(_frame_tile(X, b, t, h, offs_s, offs_d, stride_b, stride_t, stride_s, stride_h, ALIGN),
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_tile(X, value, b, t, h, offs_s, ok, offs_d, stride_b, stride_t, stride_s, stride_h, D: tl.constexpr,
                ALIGN: tl.constexpr):
    """Stores `value` (float32) in X's dtype at X[b, t, offs_s, h, offs_d] where the token and the column exist."""
    tl.store(_frame_tile(X, b, t, h, offs_s, offs_d, stride_b, stride_t, stride_s, stride_h, ALIGN),
             value.to(X.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
               stride_v_b, stride_v_t, stride_v_s, stride_v_h, D: tl.constexpr, BLOCK_N: tl.constexpr,
               ALIGN: tl.constexpr):
    """Which of tokens start_n .. start_n + BLOCK_N of (b, t, h) exist, and their keys and values at columns
    `offs_d`."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < S
    k = _load_tile(K, b, t, h, offs_n, key_ok, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h, D, ALIGN)
    v = _load_tile(V, b, t, h, offs_n, key_ok, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, ALIGN)
    return key_ok, k, v


@triton.jit
def _spatial_forward_kernel(
        Q, K, V, Out, Lse,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_o_b, stride_o_t, stride_o_s, stride_o_h,
        T, S, H, scale, D: tl.constexpr, ADD_TO_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,
        ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Products per key block: S = Q K^T and O += P V (each of the head dim's blocks: BLOCK_D, then TAIL_D).
    t, b, h, offs_m, row_ok, offs_d, offs_e = _program_block(S, H, BLOCK_M, BLOCK_D, TAIL_D)
    q = _load_tile(Q, b, t, h, offs_m, row_ok, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if TAIL_D > 0:
        q_e = _load_tile(Q, b, t, h, offs_m, row_ok, offs_e, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D,
                         ALIGN)
        acc_e = tl.zeros((BLOCK_M, TAIL_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        key_ok, k, v = _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                  stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N, ALIGN)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            _, k_e, v_e = _key_block(K, V, b, t, h, start_n, offs_e, S, stride_k_b, stride_k_t, stride_k_s,
                                     stride_k_h, stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N, ALIGN)
            s += mma(q_e, tl.trans(k_e), DOT_PRECISION, UPCAST_DOT)
        s = tl.where(key_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            acc_e = acc_e * alpha[:, None] + mma(p.to(v.dtype), v_e, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    tl.store(Lse + _row_offsets(b, t, h, offs_m, T, H, S), m_i + tl.log(l_i), mask=row_ok)
    _store_output(Out, acc / l_i[:, None], b, t, h, offs_m, row_ok, offs_d, stride_o_b, stride_o_t, stride_o_s,
                  stride_o_h, D, ADD_TO_OUT, ALIGN)
    if TAIL_D > 0:
        _store_output(Out, acc_e / l_i[:, None], b, t, h, offs_m, row_ok, offs_e, stride_o_b, stride_o_t,
                      stride_o_s, stride_o_h, D, ADD_TO_OUT, ALIGN)


@triton.jit
def _store_output(Out, o, b, t, h, offs_m, row_ok, offs_d, stride_b, stride_t, stride_s, stride_h, D: tl.constexpr,
                  ADD_TO_OUT: tl.constexpr, ALIGN: tl.constexpr):
    """Writes o_s (float32, rounded to the output dtype) to columns `offs_d` of the output; with ADD_TO_OUT the
    output holds o_t and gets the sum of the two rounded branches, in one read-modify-write."""
    o = o.to(Out.dtype.element_ty).to(tl.float32)
    if ADD_TO_OUT:
        o += _load_tile(Out, b, t, h, offs_m, row_ok, offs_d, stride_b, stride_t, stride_s, stride_h, D,
                        ALIGN).to(tl.float32)
    _store_tile(Out, o, b, t, h, offs_m, row_ok, offs_d, stride_b, stride_t, stride_s, stride_h, D, ALIGN)


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
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,
        ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Products per key block: S = Q K^T, dP = dO V^T, dQ += dS K, and with the summed output P K (each over the
    # head dim's blocks: BLOCK_D, then TAIL_D).
    t, b, h, offs_m, row_ok, offs_d, offs_e = _program_block(S, H, BLOCK_M, BLOCK_D, TAIL_D)
    stats = _row_offsets(b, t, h, offs_m, T, H, S)
    # delta = rowsum(dO * o_s), first from the saved output (rounded to its dtype; minus delta_t when it holds
    # the sum); the exact value, sum_j p dp / sum_j p, is accumulated on the way and goes to the key kernel. With
    # both branches summed the rounding of the saved *sum* would dominate dq's error, so dq is corrected through
    # sum_j p k. Divided by sum_j p: recomputed from a float32 logsumexp, a row's probabilities sum to 1 only
    # within its rounding (a relative 1e-7 |lse|), and at saturated scores ds = p (dp - delta) of the dominating
    # key would be that error times dp instead of about 0; divided, ds is off by that error relative to itself,
    # and dq, divided by the sum too, not at all.
    o = _load_tile(Out, b, t, h, offs_m, row_ok, offs_d, stride_o_b, stride_o_t, stride_o_s, stride_o_h, D, ALIGN)
    do = _load_tile(DOut, b, t, h, offs_m, row_ok, offs_d, stride_do_b, stride_do_t, stride_do_s, stride_do_h, D,
                    ALIGN)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if OUT_IS_SUM:
        delta -= tl.load(DeltaT + stats, mask=row_ok, other=0.0)
    q = _load_tile(Q, b, t, h, offs_m, row_ok, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D, ALIGN)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if TAIL_D > 0:
        do_e = _load_tile(DOut, b, t, h, offs_m, row_ok, offs_e, stride_do_b, stride_do_t, stride_do_s,
                          stride_do_h, D, ALIGN)
        o_e = _load_tile(Out, b, t, h, offs_m, row_ok, offs_e, stride_o_b, stride_o_t, stride_o_s, stride_o_h, D,
                         ALIGN)
        delta += tl.sum(do_e.to(tl.float32) * o_e.to(tl.float32), 1)
        q_e = _load_tile(Q, b, t, h, offs_m, row_ok, offs_e, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D,
                         ALIGN)
        dq_e = tl.zeros((BLOCK_M, TAIL_D), dtype=tl.float32)
        pk_e = tl.zeros((BLOCK_M, TAIL_D), dtype=tl.float32)
    delta_exact = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
    for start_n in range(0, S, BLOCK_N):
        key_ok, k, v = _key_block(K, V, b, t, h, start_n, offs_d, S, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                  stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N, ALIGN)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)
        dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            _, k_e, v_e = _key_block(K, V, b, t, h, start_n, offs_e, S, stride_k_b, stride_k_t, stride_k_s,
                                     stride_k_h, stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, BLOCK_N, ALIGN)
            s += mma(q_e, tl.trans(k_e), DOT_PRECISION, UPCAST_DOT)
            dp += mma(do_e, tl.trans(v_e), DOT_PRECISION, UPCAST_DOT)
        p = tl.where(key_ok[None, :], tl.exp(bounded_exponent(s * scale - lse[:, None], LN2)), 0.0)
        p_dp = p * dp
        delta_exact += tl.sum(p_dp, 1)
        p_sum += tl.sum(p, 1)
        ds = (p_dp - p * delta[:, None]).to(k.dtype)
        dq += mma(ds, k, DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            dq_e += mma(ds, k_e, DOT_PRECISION, UPCAST_DOT)
        if OUT_IS_SUM:
            pk += mma(p.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
            if TAIL_D > 0:
                pk_e += mma(p.to(k.dtype), k_e, DOT_PRECISION, UPCAST_DOT)
    delta_exact /= p_sum
    tl.store(DeltaS + stats, delta_exact, mask=row_ok)
    if OUT_IS_SUM:
        dq += (delta - delta_exact)[:, None] * pk
        if TAIL_D > 0:
            dq_e += (delta - delta_exact)[:, None] * pk_e
    dq_scale = (scale / p_sum)[:, None]  # dq of the probabilities divided by their sum, as delta
    _store_tile(DQ, dq * dq_scale, b, t, h, offs_m, row_ok, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h,
                D, ALIGN)
    if TAIL_D > 0:
        _store_tile(DQ, dq_e * dq_scale, b, t, h, offs_m, row_ok, offs_e, stride_g_b, stride_g_t, stride_g_s,
                    stride_g_h, D, ALIGN)


@triton.jit
def _spatial_backward_key_kernel(
        Q, K, V, DOut, Lse, DeltaS, DK, DV,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_do_b, stride_do_t, stride_do_s, stride_do_h,
        stride_g_b, stride_g_t, stride_g_s, stride_g_h,
        T, S, H, scale, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,
        ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Products per query block: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q (each over the head dim's
    # blocks: BLOCK_D, then TAIL_D).
    t, b, h, offs_n, key_ok, offs_d, offs_e = _program_block(S, H, BLOCK_N, BLOCK_D, TAIL_D)
    k = _load_tile(K, b, t, h, offs_n, key_ok, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h, D, ALIGN)
    v = _load_tile(V, b, t, h, offs_n, key_ok, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h, D, ALIGN)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if TAIL_D > 0:
        k_e = _load_tile(K, b, t, h, offs_n, key_ok, offs_e, stride_k_b, stride_k_t, stride_k_s, stride_k_h, D,
                         ALIGN)
        v_e = _load_tile(V, b, t, h, offs_n, key_ok, offs_e, stride_v_b, stride_v_t, stride_v_s, stride_v_h, D,
                         ALIGN)
        dk_e = tl.zeros((BLOCK_N, TAIL_D), dtype=tl.float32)
        dv_e = tl.zeros((BLOCK_N, TAIL_D), dtype=tl.float32)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < S
        q = _load_tile(Q, b, t, h, offs_m, row_ok, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D, ALIGN)
        do = _load_tile(DOut, b, t, h, offs_m, row_ok, offs_d, stride_do_b, stride_do_t, stride_do_s, stride_do_h,
                        D, ALIGN)
        stats = _row_offsets(b, t, h, offs_m, T, H, S)
        lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
        delta = tl.load(DeltaS + stats, mask=row_ok, other=0.0)
        s_t = mma(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT)  # (keys, queries)
        dp_t = mma(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            q_e = _load_tile(Q, b, t, h, offs_m, row_ok, offs_e, stride_q_b, stride_q_t, stride_q_s, stride_q_h, D,
                             ALIGN)
            do_e = _load_tile(DOut, b, t, h, offs_m, row_ok, offs_e, stride_do_b, stride_do_t, stride_do_s,
                              stride_do_h, D, ALIGN)
            s_t += mma(k_e, tl.trans(q_e), DOT_PRECISION, UPCAST_DOT)
            dp_t += mma(v_e, tl.trans(do_e), DOT_PRECISION, UPCAST_DOT)
        p_t = tl.where(row_ok[None, :], tl.exp(bounded_exponent(s_t * scale - lse[None, :], LN2)), 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        p_t = p_t.to(do.dtype)
        dv += mma(p_t, do, DOT_PRECISION, UPCAST_DOT)
        dk += mma(ds_t, q, DOT_PRECISION, UPCAST_DOT)
        if TAIL_D > 0:
            dv_e += mma(p_t, do_e, DOT_PRECISION, UPCAST_DOT)
            dk_e += mma(ds_t, q_e, DOT_PRECISION, UPCAST_DOT)
    _store_tile(DK, dk * scale, b, t, h, offs_n, key_ok, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h, D,
                ALIGN)
    _store_tile(DV, dv, b, t, h, offs_n, key_ok, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h, D, ALIGN)
    if TAIL_D > 0:
        _store_tile(DK, dk_e * scale, b, t, h, offs_n, key_ok, offs_e, stride_g_b, stride_g_t, stride_g_s,
                    stride_g_h, D, ALIGN)
        _store_tile(DV, dv_e, b, t, h, offs_n, key_ok, offs_e, stride_g_b, stride_g_t, stride_g_s, stride_g_h, D,
                    ALIGN)


# ----------------------------------------------------------------------------------------------------------
# Launch tables: one per GPU family, keyed on the head-dim bucket and the dtype (no autotuning).
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpatialConfig:
    block_m: int  # query tokens per program (forward, query kernel); query tokens per step (key kernel)
    block_n: int  # key tokens per step (forward, query kernel); key tokens per program (key kernel)
    num_warps: int
    num_stages: int
    split: bool = True  # a head dim such as 40, 80, 160 in two blocks (tiles.head_dim_split), else padded

    def head_dim_blocks(self, head_dim: int):
        """(BLOCK_D, TAIL_D) this launch compiles `head_dim` as."""
        return head_dim_split(head_dim) if self.split else (head_dim_block(head_dim), 0)


# family -> (head-dim bucket, 2-byte dtype?) -> (forward, backward query kernel, backward key kernel).
# tests/test_kernel_compilation.py compiles every entry for its family, at its bucket's head dim and at the Stable
# Diffusion head dims in it, and holds it to the family's shared memory, no register spills and its
# tensor-core instruction. Buckets 96 and 192 hold the head dims compiled in two blocks (72, 80, 96; 160).
# Hopper and datacenter Blackwell (operands from shared memory): 128-row query tiles forward, FlashAttention-2's
# small-query / large-key split backward at D <= 64, square 64-tiles at D <= 128, smaller ones past that and
# in float32.
_C = SpatialConfig
WARPGROUP_MMA = {
    (64, True): (_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(32, 128, 8, 3)),
    (96, True): (_C(128, 64, 8, 2), _C(64, 64, 8, 2), _C(64, 64, 8, 2)),
    (128, True): (_C(128, 64, 8, 2), _C(64, 64, 8, 2), _C(64, 64, 8, 2)),
    (192, True): (_C(64, 32, 8, 2), _C(64, 32, 8, 2), _C(32, 64, 8, 2)),
    (256, True): (_C(64, 32, 8, 2), _C(32, 32, 8, 1), _C(32, 32, 8, 1)),
    (64, False): (_C(32, 64, 8, 2), _C(64, 32, 8, 2), _C(32, 32, 8, 1)),
    (96, False): (_C(32, 32, 8, 2), _C(32, 16, 8, 2), _C(16, 32, 8, 1)),
    (128, False): (_C(32, 32, 8, 2), _C(32, 16, 8, 2), _C(16, 32, 8, 1)),
    (192, False): (_C(32, 16, 8, 1), _C(16, 16, 8, 1), _C(16, 16, 8, 1)),
    (256, False): (_C(32, 16, 8, 1), _C(16, 16, 8, 1), _C(16, 16, 8, 1)),
}
# Ampere, Ada and consumer Blackwell (mma.sync, accumulators and operands in registers): the backward kernels of
# a split head dim need more registers than the padded one (the tail's products keep their own operand copies),
# so where they spill they pad (split=False); forward tiles as above.
WARP_MMA = {
    **WARPGROUP_MMA,
    (64, True): (_C(128, 64, 8, 3), _C(64, 64, 8, 3), _C(32, 128, 8, 3)),
    (96, True): (_C(128, 64, 8, 2), _C(64, 32, 8, 2), _C(64, 64, 8, 2, split=False)),
    (192, True): (_C(64, 32, 8, 2), _C(32, 32, 8, 1, split=False), _C(32, 32, 8, 1, split=False)),
}
# Where one family's ptxas spills a float32 entry the others compile: sm_80 the 72-96 query kernel in two stages
# (12-24 bytes), sm_120 the D in (96, 128] forward in 32 x 32 tiles (16 bytes).
WARP_MMA_SM80 = {
    **WARP_MMA,
    (96, False): (_C(32, 32, 8, 2), _C(32, 16, 8, 1), _C(16, 32, 8, 1)),
}
WARP_MMA_SM120 = {
    **WARP_MMA,
    (128, False): (_C(32, 16, 8, 2), _C(32, 16, 8, 2), _C(16, 32, 8, 1)),
}
# sm_100's ptxas spills the D in (128, 192] key kernel in two stages (8 bytes) where sm_90's does not.
TCGEN05_MMA = {
    **WARPGROUP_MMA,
    (192, True): (_C(64, 32, 8, 2), _C(64, 32, 8, 2), _C(32, 64, 8, 1)),
}
GPU_CONFIGS = {"sm80": WARP_MMA_SM80, "sm86": WARP_MMA, "sm90": WARPGROUP_MMA, "sm100": TCGEN05_MMA,
               "sm120": WARP_MMA_SM120}
# Triton's CPU interpreter: small tiles (S = 33 spans three blocks); warps and stages are ignored.
INTERPRETER_CONFIG = SpatialConfig(16, 16, 1, 1)

KERNELS = (_spatial_forward_kernel, _spatial_backward_query_kernel, _spatial_backward_key_kernel)


def configs(head_dim: int, dtype: torch.dtype, family: str):
    """(forward, backward query, backward key) launch settings for `head_dim` and `dtype` on GPU family `family`
    (kernels/gpu_families.py), or Triton's interpreter (``"interpreter"``)."""
    if family == "interpreter":
        return (INTERPRETER_CONFIG,) * 3
    return GPU_CONFIGS[family][(head_dim_bucket(head_dim), dtype.itemsize == 2)]


# ----------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------

def _launch_options(config, q, *tensors):
    """A launch's tiles, warps, stages and compile-time constants for q's shape and dtype and the alignment of
    q and `tensors`."""
    block_d, tail_d = config.head_dim_blocks(q.shape[-1])
    return dict(D=q.shape[-1], BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, TAIL_D=tail_d,
                ALIGN=alignment(q, *tensors), **dot_constants(q.dtype), num_warps=config.num_warps,
                num_stages=config.num_stages)


def spatial_forward(q, k, v, out, *, scale, add_to_out):
    B, T, S, H, D = q.shape
    lse = row_statistics(B, T, S, H, q.device)
    config = configs(D, q.dtype, launch_family(q.device))[0]
    _spatial_forward_kernel[(T, triton.cdiv(S, config.block_m), B * H)](
        q, k, v, out, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(out),
        T, S, H, scale, ADD_TO_OUT=add_to_out, **_launch_options(config, q, k, v, out))
    return lse


def spatial_backward(dout, q, k, v, out, lse, *, scale, delta_t):
    B, T, S, H, D = q.shape
    dq, dk, dv = (new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta_s = row_statistics(B, T, S, H, q.device)
    _, query_config, key_config = configs(D, q.dtype, launch_family(q.device))
    _spatial_backward_query_kernel[(T, triton.cdiv(S, query_config.block_m), B * H)](
        q, k, v, out, dout, lse, delta_t, delta_s, dq,
        *strides4(q), *strides4(k), *strides4(v), *strides4(out), *strides4(dout), *strides4(dq),
        T, S, H, scale, OUT_IS_SUM=delta_t is not None, **_launch_options(query_config, q, k, v, out, dout, dq))
    _spatial_backward_key_kernel[(T, triton.cdiv(S, key_config.block_n), B * H)](
        q, k, v, dout, lse, delta_s, dk, dv,
        *strides4(q), *strides4(k), *strides4(v), *strides4(dout), *strides4(dk),
        T, S, H, scale, **_launch_options(key_config, q, k, v, dout, dk, dv))
    return dq, dk, dv

"""Triton kernels of the fused parallel spatial-temporal attention on the (B, T, S, H, D) layout.

Implements the kernel interface of ``pychop.ops.attention`` (see its module docstring):

    forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale, temporal_causal, temporal_window, stacked)
        -> out (B, T, S, H, D) or stacked (B, T, S, 2, H, D), lse_s and lse_t (B, T, H, S) float32 or None
    backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t,
             *, scale, temporal_causal, temporal_window, temporal_grad_window, stacked)
        -> (dq_s, dk_s, dv_s, dq_t, dk_t, dv_t)

Inputs are read where they lie (any strides with a last-dimension stride of 1, e.g. views of a packed
(B, T, S, 6, H, D) projection): nothing is permuted or copied. Three kernels, one program per
(frame t, block of tokens, batch * head), frames fastest so that programs running together share tokens:

- ``_forward_kernel``: for a block of query tokens of frame t, the spatial branch is flash attention over the
  S keys of frame t (online softmax, ``tl.dot``); the temporal branch, for the same tokens, an online softmax
  over the key frames N(t), each a row-wise dot product of the token's query with its own key in frame t'
  (CUDA-core work, bound by memory). Writes ``out = o_s + o_t`` once (stacked: o_s and o_t side by side,
  the temporal one at ``Out + so_branch``) and the natural-log logsumexp of each.
- ``_backward_query_kernel``: per block of query tokens of frame t. Temporal: one pass over N(t) recomputes
  p from lse_t and accumulates dq_t and the branch's ``delta_t = sum_t' p dp`` (no o_t needed). Spatial:
  FlashAttention-2's dq loop with ``delta_s = rowsum(dO * out) - delta_t`` (only the sum was saved),
  which also accumulates the exact ``delta_s = sum_j p dp`` and, with both branches summed, ``sum_j p k`` to
  correct dq for the rounding of the saved sum (one extra tl.dot). Stacked, each branch has its own output
  gradient (the temporal one at ``DOut + sdo_branch``) and ``delta_s = rowsum(dO_s * o_s)``, as
  FlashAttention computes it. Stores dq_s, dq_t and both exact deltas (float32, B*T*H*S each).
- ``_backward_key_kernel``: per block of key tokens of frame t. Spatial: FlashAttention-2's dk/dv loop over
  the query blocks of the frame. Temporal: dk_t and dv_t from the query frames u that attend to frame t
  within the gradient band, ``u < t + min(window, grad_window)``: with a grad window k its cost grows with
  T * k, not T^2. (dq_t keeps its full range: the queries always receive their whole gradient.)

Every program recomputes probabilities from the row statistics and keeps nothing quadratic. Each kernel is
compiled per head dim D (padded to a power of two >= 16 with masks) and per dtype; float16 and bfloat16
accumulate in float32, float32 multiplies in full precision (``input_precision="ieee"``, no TF32). Loads are
16-byte vectors when strides are multiples of 16 and pointers 16-byte aligned (Triton specialises launches on
both), else narrower.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .outputs import new_output

if os.environ.get("TRITON_INTERPRET") == "1":
    from . import interpreter_compat

    interpreter_compat.apply()

LOG2E = tl.constexpr(1.4426950408889634)  # the spatial branch scores in log2 units: exp2 instead of exp
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _tile(X, b, t, h, offs_s, offs_d, stride_b, stride_t, stride_s, stride_h):
    """Pointers to rows `offs_s` (tokens) x columns `offs_d` of X[b, t, :, h, :]: an int64 offset to the
    (b, t, h) slice, int32 offsets within it."""
    base = tl.cast(b, tl.int64) * stride_b + tl.cast(t, tl.int64) * stride_t + tl.cast(h, tl.int64) * stride_h
    return X + base + (offs_s[:, None] * stride_s + offs_d[None, :])


@triton.jit
def _row_offsets(b, t, h, offs_s, T, H, S):
    """Offsets of tokens `offs_s` of (b, t, h) in a contiguous (B, T, H, S) row-statistics tensor."""
    return ((tl.cast(b, tl.int64) * T + t) * H + h) * S + offs_s


@triton.jit
def _program_block(S, H, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (t, b, h), its block of BLOCK tokens of (b, t, h) and the head dimension's columns:
    (t, b, h, token offsets, column offsets, token mask, token x column mask). Grid (T, blocks of S, B * H)."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(2) // H
    h = tl.program_id(2) % H
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < S
    return t, b, h, offs, offs_d, ok, ok[:, None] & (offs_d[None, :] < D)


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot accumulating in float32; UPCAST feeds it float32 (the interpreter cannot multiply bfloat16)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _forward_kernel(
        Qs, Ks, Vs, Qt, Kt, Vt, Out, LseS, LseT,
        sqs_b, sqs_t, sqs_s, sqs_h, sks_b, sks_t, sks_s, sks_h, svs_b, svs_t, svs_s, svs_h,
        sqt_b, sqt_t, sqt_s, sqt_h, skt_b, skt_t, skt_s, skt_h, svt_b, svt_t, svt_s, svt_h,
        so_b, so_t, so_s, so_h, so_branch,
        T, S, H, scale, window, D: tl.constexpr,
        HAS_SPATIAL: tl.constexpr, HAS_TEMPORAL: tl.constexpr, CAUSAL: tl.constexpr, STACKED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_m, offs_d, row_ok, tile_ok = _program_block(S, H, D, BLOCK_M, BLOCK_D)
    qk_scale = scale * LOG2E
    out_tile = _tile(Out, b, t, h, offs_m, offs_d, so_b, so_t, so_s, so_h)
    # o_s is held rounded to the output dtype (as the unfused path rounds it) while the temporal branch runs.
    out = tl.zeros((BLOCK_M, BLOCK_D), dtype=Out.dtype.element_ty)
    stats = _row_offsets(b, t, h, offs_m, T, H, S)

    if HAS_SPATIAL:
        q = tl.load(_tile(Qs, b, t, h, offs_m, offs_d, sqs_b, sqs_t, sqs_s, sqs_h), mask=tile_ok, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, S, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < S
            kv_ok = key_ok[:, None] & (offs_d[None, :] < D)
            k = tl.load(_tile(Ks, b, t, h, offs_n, offs_d, sks_b, sks_t, sks_s, sks_h), mask=kv_ok,
                        other=0.0)
            v = tl.load(_tile(Vs, b, t, h, offs_n, offs_d, svs_b, svs_t, svs_s, svs_h), mask=kv_ok,
                        other=0.0)
            s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
            m_i = m_new
        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        tl.store(LseS + stats, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)
        if STACKED:
            tl.store(out_tile, out, mask=tile_ok)

    if HAS_TEMPORAL:
        # Per-row scalars in natural-log units: a query with one key frame then gets p = exp(0) = 1 exactly in
        # the backward, and exact zero gradients for q_t and k_t, as the unfused path gives.
        first = tl.maximum(t - window + 1, 0)
        last = t + 1 if CAUSAL else T
        q = tl.load(_tile(Qt, b, t, h, offs_m, offs_d, sqt_b, sqt_t, sqt_s, sqt_h), mask=tile_ok, other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for u in range(first, last):
            k = tl.load(_tile(Kt, b, u, h, offs_m, offs_d, skt_b, skt_t, skt_s, skt_h), mask=tile_ok,
                        other=0.0)
            v = tl.load(_tile(Vt, b, u, h, offs_m, offs_d, svt_b, svt_t, svt_s, svt_h), mask=tile_ok,
                        other=0.0)
            s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1) * scale
            m_new = tl.maximum(m_i, s)
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
            m_i = m_new
        tl.store(LseT + stats, m_i + tl.log(l_i), mask=row_ok)
        if STACKED:
            tl.store(out_tile + so_branch, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=tile_ok)
        else:
            out = (out.to(tl.float32) + acc / l_i[:, None]).to(Out.dtype.element_ty)

    if not STACKED:
        tl.store(out_tile, out, mask=tile_ok)


@triton.jit
def _backward_query_kernel(
        Qs, Ks, Vs, Qt, Kt, Vt, Out, DOut, LseS, LseT, DeltaS, DeltaT, DQs, DQt,
        sqs_b, sqs_t, sqs_s, sqs_h, sks_b, sks_t, sks_s, sks_h, svs_b, svs_t, svs_s, svs_h,
        sqt_b, sqt_t, sqt_s, sqt_h, skt_b, skt_t, skt_s, skt_h, svt_b, svt_t, svt_s, svt_h,
        so_b, so_t, so_s, so_h, sdo_b, sdo_t, sdo_s, sdo_h, sdo_branch, sg_b, sg_t, sg_s, sg_h,
        T, S, H, scale, window, D: tl.constexpr,
        HAS_SPATIAL: tl.constexpr, HAS_TEMPORAL: tl.constexpr, CAUSAL: tl.constexpr, OUT_IS_SUM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_m, offs_d, row_ok, tile_ok = _program_block(S, H, D, BLOCK_M, BLOCK_D)
    qk_scale = scale * LOG2E
    stats = _row_offsets(b, t, h, offs_m, T, H, S)
    do_tile = _tile(DOut, b, t, h, offs_m, offs_d, sdo_b, sdo_t, sdo_s, sdo_h)
    delta_t = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if HAS_TEMPORAL:
        # dq = scale * sum_u p_u (dp_u - delta) k_u with delta = sum_u p_u dp_u, in one pass:
        # accumulate sum p dp k and sum p k, and combine once delta is known.
        first = tl.maximum(t - window + 1, 0)
        last = t + 1 if CAUSAL else T
        q = tl.load(_tile(Qt, b, t, h, offs_m, offs_d, sqt_b, sqt_t, sqt_s, sqt_h), mask=tile_ok, other=0.0)
        lse = tl.load(LseT + stats, mask=row_ok, other=0.0)
        do = tl.load(do_tile + sdo_branch, mask=tile_ok, other=0.0)
        pdpk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for u in range(first, last):
            k = tl.load(_tile(Kt, b, u, h, offs_m, offs_d, skt_b, skt_t, skt_s, skt_h), mask=tile_ok,
                        other=0.0).to(tl.float32)
            v = tl.load(_tile(Vt, b, u, h, offs_m, offs_d, svt_b, svt_t, svt_s, svt_h), mask=tile_ok,
                        other=0.0).to(tl.float32)
            p = tl.exp(tl.sum(q.to(tl.float32) * k, 1) * scale - lse)
            pdp = p * tl.sum(do.to(tl.float32) * v, 1)
            delta_t += pdp
            pdpk += pdp[:, None] * k
            pk += p[:, None] * k
        dq = (pdpk - delta_t[:, None] * pk) * scale
        tl.store(_tile(DQt, b, t, h, offs_m, offs_d, sg_b, sg_t, sg_s, sg_h), dq.to(DQt.dtype.element_ty), mask=tile_ok)
        tl.store(DeltaT + stats, delta_t, mask=row_ok)

    if HAS_SPATIAL:
        o = tl.load(_tile(Out, b, t, h, offs_m, offs_d, so_b, so_t, so_s, so_h), mask=tile_ok, other=0.0)
        if not OUT_IS_SUM:  # summed, both branches share the gradient the temporal pass loaded
            do = tl.load(do_tile, mask=tile_ok, other=0.0)
        # delta = rowsum(dO * o_s), first from the saved output (rounded to its dtype; minus delta_t when it
        # holds the sum); the exact value, sum_j p dp, is accumulated on the way and goes to the key kernel.
        # With both branches summed the rounding of the saved *sum* would dominate dq's error, so dq is
        # corrected through sum_j p k.
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if OUT_IS_SUM:
            delta -= delta_t
        delta_exact = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        q = tl.load(_tile(Qs, b, t, h, offs_m, offs_d, sqs_b, sqs_t, sqs_s, sqs_h), mask=tile_ok, other=0.0)
        lse = tl.load(LseS + stats, mask=row_ok, other=0.0) * LOG2E
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, S, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_ok = offs_n < S
            kv_ok = key_ok[:, None] & (offs_d[None, :] < D)
            k = tl.load(_tile(Ks, b, t, h, offs_n, offs_d, sks_b, sks_t, sks_s, sks_h), mask=kv_ok, other=0.0)
            v = tl.load(_tile(Vs, b, t, h, offs_n, offs_d, svs_b, svs_t, svs_s, svs_h), mask=kv_ok, other=0.0)
            s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
            p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = _mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
            p_dp = p * dp
            delta_exact += tl.sum(p_dp, 1)
            ds = p_dp - p * delta[:, None]
            dq += _mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
            if OUT_IS_SUM:
                pk += _mma(p.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
        if OUT_IS_SUM:
            dq += (delta - delta_exact)[:, None] * pk
        tl.store(DeltaS + stats, delta_exact, mask=row_ok)
        tl.store(_tile(DQs, b, t, h, offs_m, offs_d, sg_b, sg_t, sg_s, sg_h),
                 (dq * scale).to(DQs.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_key_kernel(
        Qs, Ks, Vs, Qt, Kt, Vt, DOut, LseS, LseT, DeltaS, DeltaT, DKs, DVs, DKt, DVt,
        sqs_b, sqs_t, sqs_s, sqs_h, sks_b, sks_t, sks_s, sks_h, svs_b, svs_t, svs_s, svs_h,
        sqt_b, sqt_t, sqt_s, sqt_h, skt_b, skt_t, skt_s, skt_h, svt_b, svt_t, svt_s, svt_h,
        sdo_b, sdo_t, sdo_s, sdo_h, sdo_branch, sg_b, sg_t, sg_s, sg_h,
        T, S, H, scale, band, D: tl.constexpr,
        HAS_SPATIAL: tl.constexpr, HAS_TEMPORAL: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    t, b, h, offs_n, offs_d, key_ok, tile_ok = _program_block(S, H, D, BLOCK_N, BLOCK_D)
    qk_scale = scale * LOG2E

    if HAS_SPATIAL:
        k = tl.load(_tile(Ks, b, t, h, offs_n, offs_d, sks_b, sks_t, sks_s, sks_h), mask=tile_ok, other=0.0)
        v = tl.load(_tile(Vs, b, t, h, offs_n, offs_d, svs_b, svs_t, svs_s, svs_h), mask=tile_ok, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start_m in range(0, S, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < S
            q_ok = row_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(_tile(Qs, b, t, h, offs_m, offs_d, sqs_b, sqs_t, sqs_s, sqs_h), mask=q_ok, other=0.0)
            do = tl.load(_tile(DOut, b, t, h, offs_m, offs_d, sdo_b, sdo_t, sdo_s, sdo_h), mask=q_ok,
                         other=0.0)
            stats = _row_offsets(b, t, h, offs_m, T, H, S)
            lse = tl.load(LseS + stats, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DeltaS + stats, mask=row_ok, other=0.0)
            s_t = _mma(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * qk_scale  # (keys, queries)
            p_t = tl.where(row_ok[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
            dv += _mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
            dp_t = _mma(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _mma(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)
        tl.store(_tile(DKs, b, t, h, offs_n, offs_d, sg_b, sg_t, sg_s, sg_h),
                 (dk * scale).to(DKs.dtype.element_ty), mask=tile_ok)
        tl.store(_tile(DVs, b, t, h, offs_n, offs_d, sg_b, sg_t, sg_s, sg_h), dv.to(DVs.dtype.element_ty), mask=tile_ok)

    if HAS_TEMPORAL:
        # Query frames u that attend to key frame t, within the window and the gradient band.
        first = t if CAUSAL else 0
        last = tl.minimum(t + band, T)
        k = tl.load(_tile(Kt, b, t, h, offs_n, offs_d, skt_b, skt_t, skt_s, skt_h), mask=tile_ok, other=0.0)
        v = tl.load(_tile(Vt, b, t, h, offs_n, offs_d, svt_b, svt_t, svt_s, svt_h), mask=tile_ok, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for u in range(first, last):
            q = tl.load(_tile(Qt, b, u, h, offs_n, offs_d, sqt_b, sqt_t, sqt_s, sqt_h), mask=tile_ok,
                        other=0.0).to(tl.float32)
            do = tl.load(_tile(DOut + sdo_branch, b, u, h, offs_n, offs_d, sdo_b, sdo_t, sdo_s, sdo_h),
                         mask=tile_ok, other=0.0).to(tl.float32)
            stats = _row_offsets(b, u, h, offs_n, T, H, S)
            lse = tl.load(LseT + stats, mask=key_ok, other=0.0)
            delta = tl.load(DeltaT + stats, mask=key_ok, other=0.0)
            p = tl.exp(tl.sum(q * k.to(tl.float32), 1) * scale - lse)
            dv += p[:, None] * do
            ds = p * (tl.sum(do * v.to(tl.float32), 1) - delta)
            dk += ds[:, None] * q
        tl.store(_tile(DKt, b, t, h, offs_n, offs_d, sg_b, sg_t, sg_s, sg_h),
                 (dk * scale).to(DKt.dtype.element_ty), mask=tile_ok)
        tl.store(_tile(DVt, b, t, h, offs_n, offs_d, sg_b, sg_t, sg_s, sg_h), dv.to(DVt.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch parameters: a small table keyed on the padded head dim and the dtype (no autotuning).
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query tokens per program (forward, backward query kernel); query block of the key kernel
    block_n: int  # key tokens per inner step (forward, query kernel); key tokens per program (key kernel)
    num_warps: int
    num_stages: int


# (largest padded head dim, 2-byte dtype?) -> (forward, backward query kernel, backward key kernel).
# Hopper-oriented: 128-row query tiles forward, FlashAttention-2's small-query / large-key split backward at
# D <= 64, square 64-tiles at D = 128, smaller tiles at D = 256 and in float32. Every entry compiles for sm_90
# with at most 24 bytes of register spills per thread (ptxas -v; 16-byte aligned pointers and strides).
_GPU_CONFIGS = {
    (64, True): (LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 3), LaunchConfig(32, 128, 8, 3)),
    (128, True): (LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 64, 8, 2)),
    (256, True): (LaunchConfig(64, 32, 8, 2), LaunchConfig(32, 32, 8, 1), LaunchConfig(32, 32, 8, 1)),
    (64, False): (LaunchConfig(64, 64, 8, 2), LaunchConfig(64, 32, 8, 2), LaunchConfig(32, 32, 8, 2)),
    (128, False): (LaunchConfig(32, 32, 8, 2), LaunchConfig(32, 16, 8, 2), LaunchConfig(16, 32, 8, 1)),
    (256, False): (LaunchConfig(32, 16, 8, 1), LaunchConfig(16, 16, 8, 1), LaunchConfig(16, 16, 8, 1)),
}
# Triton's CPU interpreter: small tiles (S = 33 spans three blocks), warps and stages are ignored.
_INTERPRETER_CONFIG = LaunchConfig(16, 16, 1, 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _configs(head_dim_block: int, dtype: torch.dtype):
    if _interpreting():
        return (_INTERPRETER_CONFIG,) * 3
    key = next(size for size in (64, 128, 256) if head_dim_block <= size)
    return _GPU_CONFIGS[(key, dtype.itemsize == 2)]


def _strides(x):
    """(b, t, s, h) strides of a (B, T, S, H, D) tensor; zeros for an absent branch's tensor."""
    return x.stride()[:4] if x is not None else (0, 0, 0, 0)


def _output_strides(x, stacked):
    """(b, t, s, h, branch) strides of an output or output gradient: (B, T, S, H, D), or (B, T, S, 2, H, D)
    stacked, whose temporal branch lies `branch` elements after the spatial one (0 when summed)."""
    return (*_strides(x[:, :, :, 0]), x.stride(3)) if stacked else (*_strides(x), 0)


def _common(q_s, q_t):
    """(first present input, (B, T, S, H, D), padded head dim, the constants of tl.dot's precision)."""
    first = q_s if q_s is not None else q_t
    B, T, S, H, D = first.shape
    dots = dict(DOT_PRECISION="ieee" if first.dtype == torch.float32 else "tf32",  # float32 stays float32
                UPCAST_DOT=_interpreting() and first.dtype == torch.bfloat16)
    return first, (B, T, S, H, D), _head_dim_block(D), dots


# ----------------------------------------------------------------------------------------------------------
# The kernel interface.
# ----------------------------------------------------------------------------------------------------------

def forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale, temporal_causal, temporal_window, stacked):
    """Output (B, T, S, H, D), or (B, T, S, 2, H, D) stacked, in the input dtype and each present branch's lse
    (B, T, H, S) float32."""
    first, (B, T, S, H, D), block_d, dots = _common(q_s, q_t)
    has_spatial, has_temporal = q_s is not None, q_t is not None
    out = new_output((B, T, S, 2, H, D) if stacked else (B, T, S, H, D), dtype=first.dtype, device=first.device)
    lse_s = new_output((B, T, H, S), dtype=torch.float32, device=first.device) if has_spatial else None
    lse_t = new_output((B, T, H, S), dtype=torch.float32, device=first.device) if has_temporal else None
    config = _configs(block_d, first.dtype)[0]
    grid = (T, triton.cdiv(S, config.block_m), B * H)
    _forward_kernel[grid](
        q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t,
        *_strides(q_s), *_strides(k_s), *_strides(v_s), *_strides(q_t), *_strides(k_t), *_strides(v_t),
        *_output_strides(out, stacked),
        T, S, H, scale, temporal_window or T,
        HAS_SPATIAL=has_spatial, HAS_TEMPORAL=has_temporal, CAUSAL=bool(temporal_causal), STACKED=stacked, D=D,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, **dots,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse_s, lse_t


def backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, *, scale, temporal_causal, temporal_window,
             temporal_grad_window, stacked):
    """Gradients of the six inputs (None for an absent branch), contiguous, in the input dtype.

    Besides the gradients, allocates two float32 (B, T, H, S) row tensors (delta_s, delta_t): nothing quadratic.
    """
    first, (B, T, S, H, D), block_d, dots = _common(q_s, q_t)
    has_spatial, has_temporal = q_s is not None, q_t is not None

    def gradient(present):
        return new_output((B, T, S, H, D), dtype=first.dtype, device=first.device) if present else None

    def rows(present):
        return new_output((B, T, H, S), dtype=torch.float32, device=first.device) if present else None

    dq_s, dk_s, dv_s = (gradient(has_spatial) for _ in range(3))
    dq_t, dk_t, dv_t = (gradient(has_temporal) for _ in range(3))
    delta_s, delta_t = rows(has_spatial), rows(has_temporal)
    grad_strides = (dq_s if has_spatial else dq_t).stride()[:4]
    inputs = (q_s, k_s, v_s, q_t, k_t, v_t)
    input_strides = [stride for x in inputs for stride in _strides(x)]
    query_config, key_config = _configs(block_d, first.dtype)[1:]
    constants = dict(HAS_SPATIAL=has_spatial, HAS_TEMPORAL=has_temporal, CAUSAL=bool(temporal_causal), D=D,
                     BLOCK_D=block_d, **dots)

    window = temporal_window or T
    _backward_query_kernel[(T, triton.cdiv(S, query_config.block_m), B * H)](
        *inputs, out, dout, lse_s, lse_t, delta_s, delta_t, dq_s, dq_t,
        *input_strides, *_output_strides(out, stacked)[:4], *_output_strides(dout, stacked), *grad_strides,
        T, S, H, scale, window, OUT_IS_SUM=has_spatial and has_temporal and not stacked, **constants,
        BLOCK_M=query_config.block_m, BLOCK_N=query_config.block_n,
        num_warps=query_config.num_warps, num_stages=query_config.num_stages)

    band = min(window, temporal_grad_window or T)  # query frames u < t + band send gradient to key frame t
    _backward_key_kernel[(T, triton.cdiv(S, key_config.block_n), B * H)](
        *inputs, dout, lse_s, lse_t, delta_s, delta_t, dk_s, dv_s, dk_t, dv_t,
        *input_strides, *_output_strides(dout, stacked), *grad_strides,
        T, S, H, scale, band, **constants,
        BLOCK_M=key_config.block_m, BLOCK_N=key_config.block_n,
        num_warps=key_config.num_warps, num_stages=key_config.num_stages)
    return dq_s, dk_s, dv_s, dq_t, dk_t, dv_t

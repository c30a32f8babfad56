"""Triton kernels of the temporal branch: each token attends over frames, on (B, T, S, H, D).

For one token the temporal branch is a T x T attention. A program owns BLOCK_M rows, each a (token, frame)
pair: BLOCK_T consecutive frames (T rounded up to a power of two, at most BLOCK_M) of BLOCK_M // BLOCK_T
consecutive tokens. Its scores are one BLOCK_M x BLOCK_M tl.dot on tensor cores (warpgroup MMA on Hopper)
whose entries across two tokens are masked: the masked work is cheap next to the memory time of this
memory-bound branch. Whenever T <= BLOCK_M, one block holds every frame of a token, so each kernel reads each
input element from global memory a fixed number of times, however large T is (tests/test_triton_load_counts.py
counts them); beyond that, reads grow as T / BLOCK_M, as FlashAttention's key reads grow with the number of
query blocks. Launchers:

    temporal_forward(q, k, v, out, *, scale, causal, window) -> lse (B, T, H, S) float32
        writes o_t into `out` (B, T, S, H, D).
    temporal_backward(dout, q, k, v, lse, *, scale, causal, window, grad_window) -> (dq, dk, dv, delta)
        contiguous gradients and delta = rowsum(P dP) / rowsum(P) (B, T, H, S) float32, which the spatial backward
        of the summed output needs (divided by rowsum(P), 1 within rounding, as in the spatial query kernel).

A non-finite input of one token reaches the other tokens of its program (the masked cross-token products multiply
it by zero); finite inputs are unaffected. Scores are in natural-log units (a query with one key frame gets p =
exp(0) = 1 exactly in the backward, and exact zero gradients, as the unfused path). Kernels:
``_temporal_forward_kernel`` (online softmax over blocks of key frames); ``_temporal_backward_query_kernel`` (dq
and delta: one pass when one block holds every key frame, else a pass for delta and one for dq);
``_temporal_backward_key_kernel`` (dk, dv from the query frames u that reach key frame t within the gradient band,
``u - t < min(window, grad_window)``: with a grad window its work grows with T * k).
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
    launch_family,
    mma,
    row_statistics,
    strides4,
)


@triton.jit
def _rows(first_token, first_frame, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """The (token, frame) of each of a program's BLOCK_M rows: BLOCK_M // BLOCK_T tokens, BLOCK_T frames each."""
    r = tl.arange(0, BLOCK_M)
    return first_token + r // BLOCK_T, first_frame + r % BLOCK_T


@triton.jit
def _tile(X, b, h, tokens, frames, offs_d, stride_b, stride_t, stride_s, stride_h, ALIGN: tl.constexpr):
    """Pointers to X[b, frames[r], tokens[r], h, offs_d] for each row r: a (rows, columns) tile; int64 offsets.
    Each row starts at a multiple of ALIGN elements (checked by the host: ``tiles.alignment``)."""
    base = tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h
    rows = base + tl.cast(tokens, tl.int64) * stride_s + tl.cast(frames, tl.int64) * stride_t
    rows = tl.multiple_of(rows, ALIGN)
    return X + rows[:, None] + offs_d[None, :]


@triton.jit
def _stat_rows(b, h, tokens, frames, T, H, S):
    """Offsets of rows (tokens, frames) of (b, h) in a contiguous (B, T, H, S) row-statistics tensor."""
    return ((tl.cast(b, tl.int64) * T + frames) * H + h) * S + tokens


@triton.jit
def _allowed(q_tokens, q_frames, k_tokens, k_frames, T, S, reach, CAUSAL: tl.constexpr):
    """(query rows, key rows): True where both rows exist, belong to one token and 0 <= t - t' < reach (causal)
    or t - t' < reach (not causal)."""
    lag = q_frames[:, None] - k_frames[None, :]
    allowed = (q_tokens[:, None] == k_tokens[None, :]) & (lag < reach)
    allowed = allowed & ((q_frames < T) & (q_tokens < S))[:, None] & ((k_frames < T) & (k_tokens < S))[None, :]
    if CAUSAL:
        allowed = allowed & (lag >= 0)
    return allowed


@triton.jit
def _program_rows(S, H, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's b, h, rows (tokens, frames), columns, row mask and row x column mask. Grid (blocks of
    BLOCK_M // BLOCK_T tokens, blocks of BLOCK_T frames, B * H)."""
    tokens, frames = _rows(tl.program_id(0) * (BLOCK_M // BLOCK_T), tl.program_id(1) * BLOCK_T, BLOCK_M, BLOCK_T)
    b = tl.program_id(2) // H
    h = tl.program_id(2) % H
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, tokens, frames, offs_d, offs_d[None, :] < D


@triton.jit(do_not_specialize=["window"])  # a loop bound: no compile per window
def _temporal_forward_kernel(
        Q, K, V, Out, Lse,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_o_b, stride_o_t, stride_o_s, stride_o_h,
        T, S, H, scale, window, D: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    b, h, tokens, frames, offs_d, column_ok = _program_rows(S, H, D, BLOCK_M, BLOCK_T, BLOCK_D)
    row_ok = (tokens < S) & (frames < T)
    q = tl.load(_tile(Q, b, h, tokens, frames, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, ALIGN),
                mask=row_ok[:, None] & column_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first = tl.program_id(1) * BLOCK_T
    for start in range(tl.maximum(first - window + 1, 0), tl.minimum(first + BLOCK_T, T) if CAUSAL else T,
                       BLOCK_T):
        k, v, s, allowed = _key_frames(q, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S, window,
                                       stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                       stride_v_b, stride_v_t, stride_v_s, stride_v_h, scale, CAUSAL, BLOCK_M,
                                       BLOCK_T, ALIGN, DOT_PRECISION, UPCAST_DOT)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays empty
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    tl.store(Lse + _stat_rows(b, h, tokens, frames, T, H, S), m_i + tl.log(l_safe), mask=row_ok)
    tl.store(_tile(Out, b, h, tokens, frames, offs_d, stride_o_b, stride_o_t, stride_o_s, stride_o_h, ALIGN),
             (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & column_ok)


@triton.jit
def _key_frames(q, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S, reach,
                stride_k_b, stride_k_t, stride_k_s, stride_k_h, stride_v_b, stride_v_t, stride_v_s, stride_v_h,
                scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
                DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """For the key frames start .. start + BLOCK_T of the program's tokens: their keys and values, the scaled
    scores of the program's query rows against them and which of those the masks allow, (query rows, key rows)."""
    k_tokens, k_frames = _rows(tl.program_id(0) * (BLOCK_M // BLOCK_T), start, BLOCK_M, BLOCK_T)
    kv_ok = ((k_tokens < S) & (k_frames < T))[:, None] & column_ok
    k = tl.load(_tile(K, b, h, k_tokens, k_frames, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h, ALIGN),
                mask=kv_ok, other=0.0)
    v = tl.load(_tile(V, b, h, k_tokens, k_frames, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h, ALIGN),
                mask=kv_ok, other=0.0)
    s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale
    return k, v, s, _allowed(tokens, frames, k_tokens, k_frames, T, S, reach, CAUSAL)


@triton.jit
def _probabilities(q, do, lse, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S, reach,
                   stride_k_b, stride_k_t, stride_k_s, stride_k_h, stride_v_b, stride_v_t, stride_v_s, stride_v_h,
                   scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, ALIGN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """For the key frames start .. start + BLOCK_T of the program's tokens: (k, p, dp), p and dp of shape
    (query rows, key rows)."""
    k, v, s, allowed = _key_frames(q, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S, reach,
                                   stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                   stride_v_b, stride_v_t, stride_v_s, stride_v_h, scale, CAUSAL, BLOCK_M, BLOCK_T,
                                   ALIGN, DOT_PRECISION, UPCAST_DOT)
    p = tl.where(allowed, tl.exp(bounded_exponent(s - lse[:, None], LN2)), 0.0)
    dp = mma(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
    return k, p, dp


@triton.jit(do_not_specialize=["window"])
def _temporal_backward_query_kernel(
        Q, K, V, DOut, Lse, Delta, DQ,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_do_b, stride_do_t, stride_do_s, stride_do_h,
        stride_g_b, stride_g_t, stride_g_s, stride_g_h,
        T, S, H, scale, window, D: tl.constexpr, CAUSAL: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    b, h, tokens, frames, offs_d, column_ok = _program_rows(S, H, D, BLOCK_M, BLOCK_T, BLOCK_D)
    row_ok = (tokens < S) & (frames < T)
    tile_ok = row_ok[:, None] & column_ok
    stats = _stat_rows(b, h, tokens, frames, T, H, S)
    q = tl.load(_tile(Q, b, h, tokens, frames, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, ALIGN),
                mask=tile_ok, other=0.0)
    do = tl.load(_tile(DOut, b, h, tokens, frames, offs_d, stride_do_b, stride_do_t, stride_do_s, stride_do_h, ALIGN),
                 mask=tile_ok, other=0.0)
    lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
    first = tl.program_id(1) * BLOCK_T
    lo = tl.maximum(first - window + 1, 0)
    hi = tl.minimum(first + BLOCK_T, T) if CAUSAL else T
    # dq = scale * sum_u p_u (dp_u - delta) k_u, delta = sum_u p_u dp_u / sum_u p_u (the spatial query kernel
    # says why the division): delta must be complete before dq.
    if ONE_KEY_BLOCK:
        k, p, dp = _probabilities(q, do, lse, K, V, b, h, tokens, frames, offs_d, column_ok, lo, T, S, window,
                                  stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                  stride_v_b, stride_v_t, stride_v_s, stride_v_h, scale, CAUSAL, BLOCK_M, BLOCK_T,
                                  ALIGN, DOT_PRECISION, UPCAST_DOT)
        p_sum = tl.where(row_ok, tl.sum(p, 1), 1.0)
        delta = tl.sum(p * dp, 1) / p_sum
        dq = mma((p * (dp - delta[:, None])).to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    else:
        delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_T):
            k, p, dp = _probabilities(q, do, lse, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S,
                                      window, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                      stride_v_b, stride_v_t, stride_v_s, stride_v_h, scale, CAUSAL, BLOCK_M,
                                      BLOCK_T, ALIGN, DOT_PRECISION, UPCAST_DOT)
            delta += tl.sum(p * dp, 1)
            p_sum += tl.sum(p, 1)
        p_sum = tl.where(row_ok, p_sum, 1.0)
        delta /= p_sum
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_T):
            k, p, dp = _probabilities(q, do, lse, K, V, b, h, tokens, frames, offs_d, column_ok, start, T, S,
                                      window, stride_k_b, stride_k_t, stride_k_s, stride_k_h,
                                      stride_v_b, stride_v_t, stride_v_s, stride_v_h, scale, CAUSAL, BLOCK_M,
                                      BLOCK_T, ALIGN, DOT_PRECISION, UPCAST_DOT)
            dq += mma((p * (dp - delta[:, None])).to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    tl.store(Delta + stats, delta, mask=row_ok)
    tl.store(_tile(DQ, b, h, tokens, frames, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h, ALIGN),
             (dq * (scale / p_sum)[:, None]).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["band"])
def _temporal_backward_key_kernel(
        Q, K, V, DOut, Lse, Delta, DK, DV,
        stride_q_b, stride_q_t, stride_q_s, stride_q_h,
        stride_k_b, stride_k_t, stride_k_s, stride_k_h,
        stride_v_b, stride_v_t, stride_v_s, stride_v_h,
        stride_do_b, stride_do_t, stride_do_s, stride_do_h,
        stride_g_b, stride_g_t, stride_g_s, stride_g_h,
        T, S, H, scale, band, D: tl.constexpr, CAUSAL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    b, h, tokens, keys, offs_d, column_ok = _program_rows(S, H, D, BLOCK_M, BLOCK_T, BLOCK_D)
    tile_ok = ((tokens < S) & (keys < T))[:, None] & column_ok
    k = tl.load(_tile(K, b, h, tokens, keys, offs_d, stride_k_b, stride_k_t, stride_k_s, stride_k_h, ALIGN),
                mask=tile_ok, other=0.0)
    v = tl.load(_tile(V, b, h, tokens, keys, offs_d, stride_v_b, stride_v_t, stride_v_s, stride_v_h, ALIGN),
                mask=tile_ok, other=0.0)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first = tl.program_id(1) * BLOCK_T
    # Query frames u reaching key frame t within the gradient band: t <= u (causal) and u - t < band.
    for start in range(first if CAUSAL else 0, tl.minimum(first + BLOCK_T - 1 + band, T), BLOCK_T):
        q_tokens, queries = _rows(tl.program_id(0) * (BLOCK_M // BLOCK_T), start, BLOCK_M, BLOCK_T)
        row_ok = (q_tokens < S) & (queries < T)
        q_ok = row_ok[:, None] & column_ok
        stats = _stat_rows(b, h, q_tokens, queries, T, H, S)
        q = tl.load(_tile(Q, b, h, q_tokens, queries, offs_d, stride_q_b, stride_q_t, stride_q_s, stride_q_h, ALIGN),
                    mask=q_ok, other=0.0)
        do = tl.load(_tile(DOut, b, h, q_tokens, queries, offs_d, stride_do_b, stride_do_t, stride_do_s,
                           stride_do_h, ALIGN), mask=q_ok, other=0.0)
        lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
        delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
        s_t = mma(k, tl.trans(q), DOT_PRECISION, UPCAST_DOT) * scale  # (key rows, query rows)
        p_t = tl.where(tl.trans(_allowed(q_tokens, queries, tokens, keys, T, S, band, CAUSAL)),
                       tl.exp(bounded_exponent(s_t - lse[None, :], LN2)), 0.0)
        dv += mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST_DOT)
        dp_t = mma(v, tl.trans(do), DOT_PRECISION, UPCAST_DOT)
        dk += mma((p_t * (dp_t - delta[None, :])).to(q.dtype), q, DOT_PRECISION, UPCAST_DOT)
    tl.store(_tile(DK, b, h, tokens, keys, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h, ALIGN),
             (dk * scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(_tile(DV, b, h, tokens, keys, offs_d, stride_g_b, stride_g_t, stride_g_s, stride_g_h, ALIGN),
             dv.to(DV.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch tables: one per GPU family, keyed on the head-dim bucket and the dtype; BLOCK_T follows T.
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TemporalConfig:
    block_m: int  # (token, frame) rows per program, and key rows per step
    num_warps: int
    num_stages: int

    def blocks(self, num_frames: int):
        """(BLOCK_M, BLOCK_T) for T = num_frames: BLOCK_T frames per token, the power of two >= T up to BLOCK_M,
        so BLOCK_M // BLOCK_T tokens per program."""
        return self.block_m, min(triton.next_power_of_2(num_frames), self.block_m)


# family -> (head-dim bucket, 2-byte dtype?) -> (forward, backward query kernel, backward key kernel); the head dim
# is padded to a power of two, so the buckets are 64, 128 and 256. tests/test_kernel_compilation.py compiles
# every entry for its family and holds it to the family's budgets.
_C = TemporalConfig
WARPGROUP_MMA = {
    (64, True): (_C(64, 4, 2), _C(64, 4, 2), _C(64, 4, 2)),
    (128, True): (_C(64, 4, 2), _C(64, 8, 2), _C(64, 8, 2)),
    (256, True): (_C(64, 8, 2), _C(32, 8, 2), _C(32, 8, 1)),
    (64, False): (_C(32, 8, 2), _C(32, 4, 2), _C(32, 8, 2)),
    (128, False): (_C(16, 4, 1), _C(16, 8, 1), _C(16, 4, 1)),
    (256, False): (_C(16, 4, 1), _C(16, 8, 1), _C(16, 8, 1)),
}
# mma.sync keeps operands and accumulators in registers: at D <= 64 the backward query kernel over 8 warps, the
# key kernel in 32-row programs (64 rows spill at T = 16 over 4 or 8 warps); the float32 D in (128, 256] query
# kernel over 4 warps (8 spill: sm_80 24 bytes, sm_86 and sm_120 too).
WARP_MMA = {
    **WARPGROUP_MMA,
    (64, True): (_C(64, 4, 2), _C(64, 8, 2), _C(32, 4, 2)),
    (256, False): (_C(16, 4, 1), _C(16, 4, 1), _C(16, 8, 1)),
}
# sm_80's ptxas spills the D in (64, 128] query kernel's two-pass loop (T > 64) in 64-row programs (184-456
# bytes, 4 or 8 warps, 1 or 2 stages): 32 rows; and the float32 D <= 64 one at T = 16 over 4 warps (16 bytes).
WARP_MMA_SM80 = {
    **WARP_MMA,
    (128, True): (_C(64, 4, 2), _C(32, 4, 2), _C(64, 8, 2)),
    (64, False): (_C(32, 8, 2), _C(32, 8, 2), _C(32, 8, 2)),
}
# 99 KiB of shared memory: the forward at D in (128, 256] in 32-row programs.
WARP_MMA_99KIB = {
    **WARP_MMA,
    (256, True): (_C(32, 8, 2), _C(32, 8, 2), _C(32, 8, 1)),
}
GPU_CONFIGS = {"sm80": WARP_MMA_SM80, "sm86": WARP_MMA_99KIB, "sm90": WARPGROUP_MMA, "sm100": WARPGROUP_MMA,
               "sm120": WARP_MMA_99KIB}
# Triton's CPU interpreter: 16-row programs, so T = 17 spans two 16-frame blocks and T = 4 packs 4 tokens.
INTERPRETER_CONFIG = TemporalConfig(16, 1, 1)

KERNELS = (_temporal_forward_kernel, _temporal_backward_query_kernel, _temporal_backward_key_kernel)


def configs(head_dim: int, dtype: torch.dtype, family: str):
    """(forward, backward query, backward key) launch settings for `head_dim` and `dtype` on GPU family `family`
    (kernels/gpu_families.py), or Triton's interpreter (``"interpreter"``)."""
    if family == "interpreter":
        return (INTERPRETER_CONFIG,) * 3
    return GPU_CONFIGS[family][(head_dim_bucket(head_dim_block(head_dim)), dtype.itemsize == 2)]


def _launch(kernel, config, tensors, strides, T, S, H, B, D, dtype, **constants):
    block_m, block_t = config.blocks(T)
    kernel[(triton.cdiv(S, block_m // block_t), triton.cdiv(T, block_t), B * H)](
        *tensors, *strides, T, S, H, **constants, D=D, BLOCK_M=block_m, BLOCK_T=block_t,
        BLOCK_D=head_dim_block(D), ALIGN=alignment(*(x for x in tensors if x.dim() == 5)),
        **dot_constants(dtype), num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------

def temporal_forward(q, k, v, out, *, scale, causal, window):
    B, T, S, H, D = q.shape
    lse = row_statistics(B, T, S, H, q.device)
    strides = (*strides4(q), *strides4(k), *strides4(v), *strides4(out))
    _launch(_temporal_forward_kernel, configs(D, q.dtype, launch_family(q.device))[0], (q, k, v, out, lse), strides,
            T, S, H, B, D, q.dtype, scale=scale, window=window or T, CAUSAL=causal)
    return lse


def temporal_backward(dout, q, k, v, lse, *, scale, causal, window, grad_window):
    B, T, S, H, D = q.shape
    dq, dk, dv = (new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = row_statistics(B, T, S, H, q.device)
    _, query_config, key_config = configs(D, q.dtype, launch_family(q.device))
    window = window or T
    strides = (*strides4(q), *strides4(k), *strides4(v), *strides4(dout), *strides4(dq))
    _launch(_temporal_backward_query_kernel, query_config, (q, k, v, dout, lse, delta, dq), strides, T, S, H, B, D,
            q.dtype, scale=scale, window=window, CAUSAL=causal, ONE_KEY_BLOCK=query_config.blocks(T)[1] >= T)
    band = min(window, grad_window or T)  # query frames u < t + band send gradient to key frame t
    _launch(_temporal_backward_key_kernel, key_config, (q, k, v, dout, lse, delta, dk, dv), strides, T, S, H, B, D,
            q.dtype, scale=scale, band=band, CAUSAL=causal)
    return dq, dk, dv, delta

// Shared-memory layouts of the attention kernels and the block sizes that fit a device, host and device alike.
// Query and key blocks are square: BLOCK x BLOCK. Plain C++: tests/test_extension_build.py checks the layouts
// and plans on the host.
#pragma once

#include <cstddef>

#include "attention/cuda/head_dim_switch.h"
#include "attention/params.h"

namespace pychop {
namespace cuda {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
// Blocks per SM the kernels' register budget is for (__launch_bounds__): at 128 threads, any count up to 255
// registers. Without it, ptxas trades registers for occupancy and spills (sm_80, 16-row blocks).
constexpr int MIN_BLOCKS = 2;

// Leading dimensions pad rows by 16 bytes (16-bit operands) or 16 bytes (fp32) against bank conflicts; every
// row start stays a multiple of 16 bytes (16-byte copies) and every 16-row tile of 32 bytes (WMMA).
PYCHOP_HOST_DEVICE inline int operand_ld(int cols) { return cols + 8; }
PYCHOP_HOST_DEVICE inline int accum_ld(int cols) { return cols + 4; }
PYCHOP_HOST_DEVICE inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// The head dim padded to the 16-wide tiles.
PYCHOP_HOST_DEVICE inline int padded_head_dim(int D) { return (D + 15) / 16 * 16; }

// The columns of the backward's gradients a block computes, when the head dim is split over `splits` blocks to
// fit shared memory (a multiple of 16).
PYCHOP_HOST_DEVICE inline int slice_cols(int Dp, int splits) { return (Dp / 16 + splits - 1) / splits * 16; }

struct SmemLayout {  // byte offsets into dynamic shared memory
  size_t bytes = 0;
  PYCHOP_HOST_DEVICE size_t take(size_t size) {
    const size_t offset = bytes;
    bytes += align128(size);
    return offset;
  }
};

// Forward, per block of BLOCK query rows: Q, K, V tiles, scores, probabilities, the output accumulator, row
// max and sum.
struct ForwardSmem {
  int ld_qkv, ld_scores, ld_probs, ld_out;
  size_t q, k, v, scores, probs, out, row_max, row_sum, bytes;
  PYCHOP_HOST_DEVICE ForwardSmem(size_t elem, int BLOCK, int Dp) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BLOCK);
    ld_probs = operand_ld(BLOCK);
    ld_out = accum_ld(Dp);
    SmemLayout s;
    q = s.take(elem * BLOCK * ld_qkv);
    k = s.take(elem * BLOCK * ld_qkv);
    v = s.take(elem * BLOCK * ld_qkv);
    scores = s.take(sizeof(float) * BLOCK * ld_scores);
    probs = s.take(elem * BLOCK * ld_probs);
    out = s.take(sizeof(float) * BLOCK * ld_out);
    row_max = s.take(sizeof(float) * BLOCK);
    row_sum = s.take(sizeof(float) * BLOCK);
    bytes = s.bytes;
  }
};

// Backward key kernel, per block of BLOCK key rows (and Dc of the gradients' columns), BLOCK query rows at a
// time. dq (one query block's, when one key block holds every row) takes the place of scores and dprobs where it
// fits: they are dead once P and dS are formed.
struct BackwardSmem {
  int ld_qkv, ld_scores, ld_probs, ld_grad;
  size_t k, v, q, dout, scores, dprobs, probs, dscores, dk, dv, dq, lse, delta, bytes;
  PYCHOP_HOST_DEVICE BackwardSmem(size_t elem, int BLOCK, int Dp, int Dc) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BLOCK);
    ld_probs = operand_ld(BLOCK);
    ld_grad = accum_ld(Dc);
    SmemLayout s;
    k = s.take(elem * BLOCK * ld_qkv);
    v = s.take(elem * BLOCK * ld_qkv);
    q = s.take(elem * BLOCK * ld_qkv);
    dout = s.take(elem * BLOCK * ld_qkv);
    scores = s.take(sizeof(float) * BLOCK * ld_scores);
    dprobs = s.take(sizeof(float) * BLOCK * ld_scores);
    probs = s.take(elem * BLOCK * ld_probs);
    dscores = s.take(elem * BLOCK * ld_probs);
    dk = s.take(sizeof(float) * BLOCK * ld_grad);
    dv = s.take(sizeof(float) * BLOCK * ld_grad);
    const size_t dq_bytes = sizeof(float) * BLOCK * ld_grad;
    dq = dq_bytes <= probs - scores ? scores : s.take(dq_bytes);
    lse = s.take(sizeof(float) * BLOCK);
    delta = s.take(sizeof(float) * BLOCK);
    bytes = s.bytes;
  }
};

// Backward query kernel (a problem spanning several key blocks), per block of BLOCK query rows: Q and dO tiles,
// the K and V tiles of one key block at a time, scores and dprobs, dS, the dq accumulator, lse and delta.
struct QuerySmem {
  int ld_qkv, ld_scores, ld_probs, ld_grad;
  size_t q, dout, k, v, scores, dprobs, dscores, dq, lse, delta, bytes;
  PYCHOP_HOST_DEVICE QuerySmem(size_t elem, int BLOCK, int Dp) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BLOCK);
    ld_probs = operand_ld(BLOCK);
    ld_grad = accum_ld(Dp);
    SmemLayout s;
    q = s.take(elem * BLOCK * ld_qkv);
    dout = s.take(elem * BLOCK * ld_qkv);
    k = s.take(elem * BLOCK * ld_qkv);
    v = s.take(elem * BLOCK * ld_qkv);
    scores = s.take(sizeof(float) * BLOCK * ld_scores);
    dprobs = s.take(sizeof(float) * BLOCK * ld_scores);
    dscores = s.take(elem * BLOCK * ld_probs);
    dq = s.take(sizeof(float) * BLOCK * ld_grad);
    lse = s.take(sizeof(float) * BLOCK);
    delta = s.take(sizeof(float) * BLOCK);
    bytes = s.bytes;
  }
};

// The forward's block for `rows` rows (head_dim_switch.h), 0 when none fits `limit` bytes of shared memory.
inline int forward_block(size_t elem, int rows, int Dp, size_t limit) {
  return choose_block(rows, [&](int block) { return ForwardSmem(elem, block, Dp).bytes <= limit; });
}

// The backward query kernel's block, likewise.
inline int query_block(size_t elem, int rows, int Dp, size_t limit) {
  return choose_block(rows, [&](int block) { return QuerySmem(elem, block, Dp).bytes <= limit; });
}

struct BackwardPlan {
  int block = 0;   // 0: nothing fits
  int splits = 1;  // blocks sharing a key block, each computing slice_cols(Dp, splits) of the gradients' columns
};

// The backward key kernel's: the fewest head-dim splits (1, 2, 4), then the block (head_dim_switch.h), that fit.
inline BackwardPlan backward_plan(size_t elem, int rows, int Dp, size_t limit) {
  BackwardPlan plan;
  for (int splits = 1; splits <= 4 && (splits - 1) * slice_cols(Dp, splits) < Dp; splits *= 2) {
    const int Dc = slice_cols(Dp, splits);
    plan.splits = splits;
    plan.block = choose_block(rows, [&](int block) { return BackwardSmem(elem, block, Dp, Dc).bytes <= limit; });
    if (plan.block) break;
  }
  return plan;
}

}  // namespace cuda
}  // namespace pychop

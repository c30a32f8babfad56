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
// time: dk and dv accumulate over the query blocks. In `one_pass` (one key block holds every row, so one query
// block too) nothing accumulates: dv, then dk, and dq are formed in turn where scores and dprobs were (dead once
// P and dS are formed), each written out before the next takes its place.
struct BackwardSmem {
  int ld_qkv, ld_scores, ld_probs, ld_grad;
  size_t k, v, q, dout, scores, dprobs, probs, dscores, dk, dv, dq, lse, delta, bytes;
  PYCHOP_HOST_DEVICE BackwardSmem(size_t elem, int BLOCK, int Dp, int Dc, bool one_pass) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BLOCK);
    ld_probs = operand_ld(BLOCK);
    ld_grad = accum_ld(Dc);
    SmemLayout s;
    k = s.take(elem * BLOCK * ld_qkv);
    v = s.take(elem * BLOCK * ld_qkv);
    q = s.take(elem * BLOCK * ld_qkv);
    dout = s.take(elem * BLOCK * ld_qkv);
    const size_t score_bytes = align128(sizeof(float) * BLOCK * ld_scores);
    const size_t grad_bytes = align128(sizeof(float) * BLOCK * ld_grad);
    scores = s.take(2 * (one_pass && grad_bytes > score_bytes ? grad_bytes : score_bytes));
    dprobs = scores + score_bytes;
    probs = s.take(elem * BLOCK * ld_probs);
    dscores = s.take(elem * BLOCK * ld_probs);
    if (one_pass) {
      dv = dk = scores;
      dq = scores + grad_bytes;
    } else {
      dk = s.take(grad_bytes);
      dv = s.take(grad_bytes);
      dq = 0;  // the query kernel's
    }
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
    plan.block = choose_block(rows, [&](int block) {
      return BackwardSmem(elem, block, Dp, Dc, /*one_pass=*/rows <= block).bytes <= limit;
    });
    if (plan.block) break;
  }
  return plan;
}

}  // namespace cuda
}  // namespace pychop

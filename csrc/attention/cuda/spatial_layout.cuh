// Shared-memory layouts of the spatial kernels, host and device alike, and the device's shared-memory limit
// (the block size they fit is chosen by PYCHOP_SPATIAL_BLOCK_SWITCH, head_dim_switch.h).
#pragma once

#include <cstddef>

#include "attention/cuda/common.cuh"

namespace pychop {
namespace cuda {

constexpr int SPATIAL_THREADS = 128;
constexpr int SPATIAL_WARPS = SPATIAL_THREADS / 32;

// Leading dimensions pad rows by 16 bytes (16-bit operands) or 16 bytes (fp32) against bank conflicts.
__host__ __device__ inline int operand_ld(int cols) { return cols + 8; }
__host__ __device__ inline int accum_ld(int cols) { return cols + 4; }
__host__ __device__ inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// The head dim padded to the 16-wide tiles.
__host__ __device__ inline int padded_head_dim(int D) { return (D + 15) / 16 * 16; }

struct SmemLayout {  // byte offsets into dynamic shared memory
  size_t bytes = 0;
  __host__ __device__ size_t take(size_t size) {
    const size_t offset = bytes;
    bytes += align128(size);
    return offset;
  }
};

// Forward, per block of BM query rows: Q, K, V tiles, scores, probabilities, the output accumulator, row
// max and sum.
struct ForwardSmem {
  int ld_qkv, ld_scores, ld_probs, ld_out;
  size_t q, k, v, scores, probs, out, row_max, row_sum, bytes;
  __host__ __device__ ForwardSmem(size_t elem, int BM, int BN, int Dp) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BN);
    ld_probs = operand_ld(BN);
    ld_out = accum_ld(Dp);
    SmemLayout s;
    q = s.take(elem * BM * ld_qkv);
    k = s.take(elem * BN * ld_qkv);
    v = s.take(elem * BN * ld_qkv);
    scores = s.take(sizeof(float) * BM * ld_scores);
    probs = s.take(elem * BM * ld_probs);
    out = s.take(sizeof(float) * BM * ld_out);
    row_max = s.take(sizeof(float) * BM);
    row_sum = s.take(sizeof(float) * BM);
    bytes = s.bytes;
  }
};

// Backward, per block of BN key rows and BM query rows at a time.
struct BackwardSmem {
  int ld_qkv, ld_scores, ld_probs, ld_grad;
  size_t k, v, q, dout, scores, dprobs, probs, dscores, dk, dv, dq, lse, delta, bytes;
  __host__ __device__ BackwardSmem(size_t elem, int BM, int BN, int Dp) {
    ld_qkv = operand_ld(Dp);
    ld_scores = accum_ld(BN);
    ld_probs = operand_ld(BN);
    ld_grad = accum_ld(Dp);
    SmemLayout s;
    k = s.take(elem * BN * ld_qkv);
    v = s.take(elem * BN * ld_qkv);
    q = s.take(elem * BM * ld_qkv);
    dout = s.take(elem * BM * ld_qkv);
    scores = s.take(sizeof(float) * BM * ld_scores);
    dprobs = s.take(sizeof(float) * BM * ld_scores);
    probs = s.take(elem * BM * ld_probs);
    dscores = s.take(elem * BM * ld_probs);
    dk = s.take(sizeof(float) * BN * ld_grad);
    dv = s.take(sizeof(float) * BN * ld_grad);
    dq = s.take(sizeof(float) * BM * ld_grad);
    lse = s.take(sizeof(float) * BM);
    delta = s.take(sizeof(float) * BM);
    bytes = s.bytes;
  }
};

inline int max_shared_memory() {
  int device = 0, bytes = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return bytes;
}

}  // namespace cuda
}  // namespace pychop

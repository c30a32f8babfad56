// Spatial branch, backward (FlashAttention-2 style): per frame-head (b, t, h) and block of BN keys, loop over
// blocks of BM queries, recompute P = exp(scale Q K^T - lse) and dP = dO V^T, form dS = P (dP - delta), and
// accumulate dV += P^T dO and dK += dS^T Q in shared memory; dQ += dS K goes to a float32 buffer with
// atomics, cast to the output dtype by a last kernel. delta = rowsum(dO * o_s) comes from a preprocessing
// kernel: rowsum(dO * out) - delta_t when out holds o_s + o_t (the temporal backward left delta_t =
// rowsum(dO * o_t)), rowsum(dO * out) when the branches are stacked (out holds o_s, dO its own gradient).
#include "attention/cuda/block_gemm.cuh"
#include "attention/cuda/branches.h"
#include "attention/cuda/head_dim_switch.h"
#include "attention/cuda/spatial_layout.cuh"

namespace pychop {
namespace cuda {
namespace {

constexpr int ROW_THREADS = 128;  // preprocessing and dq cast: a warp per row

__device__ __forceinline__ int64_t accum_index(const AttentionParams& p, int b, int t, int s, int h) {
  return (((static_cast<int64_t>(b) * p.frames + t) * p.tokens + s) * p.heads + h) * p.head_dim;
}

// Row (b, t, s, h) of warp `row`: delta_s = rowsum(dout * o_s), and the row of dq_accum zeroed.
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS) spatial_bwd_preprocess_kernel(const AttentionParams p) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * ROW_THREADS + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch) * p.frames * p.tokens * p.heads) return;  // whole warps
  const int h = row % p.heads, s = row / p.heads % p.tokens, t = row / p.heads / p.tokens % p.frames;
  const int b = row / p.heads / p.tokens / p.frames;
  const Rows<T> out(p.out), dout(p.dout);
  const T* o = out.at(b, t, s, h);
  const T* g = dout.at(b, t, s, h);
  float* dq = p.dq_accum + accum_index(p, b, t, s, h);
  float sum = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) {
    sum += to_float(o[c]) * to_float(g[c]);
    dq[c] = 0.f;
  }
  sum = group_sum(sum, 32);
  if (lane == 0) {
    const int64_t stat = stat_index(p, b, t, h, s);
    p.delta_s[stat] = sum - (p.temporal && !p.stacked ? p.delta_t[stat] : 0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(ROW_THREADS) spatial_dq_cast_kernel(const AttentionParams p) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * ROW_THREADS + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch) * p.frames * p.tokens * p.heads) return;
  const int h = row % p.heads, s = row / p.heads % p.tokens, t = row / p.heads / p.tokens % p.frames;
  const int b = row / p.heads / p.tokens / p.frames;
  T* dst = Rows<T>(p.dq_s).at(b, t, s, h);
  const float* src = p.dq_accum + accum_index(p, b, t, s, h);
  for (int c = lane; c < p.head_dim; c += 32) dst[c] = from_float<T>(src[c]);
}

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(SPATIAL_THREADS) spatial_bwd_kernel(const AttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = p.tokens, D = p.head_dim, Dp = padded_head_dim(D);
  const BackwardSmem L(sizeof(T), BM, BN, Dp);
  T* k_tile = reinterpret_cast<T*>(smem + L.k);
  T* v_tile = reinterpret_cast<T*>(smem + L.v);
  T* q_tile = reinterpret_cast<T*>(smem + L.q);
  T* dout_tile = reinterpret_cast<T*>(smem + L.dout);
  float* scores = reinterpret_cast<float*>(smem + L.scores);
  float* dprobs = reinterpret_cast<float*>(smem + L.dprobs);
  T* probs = reinterpret_cast<T*>(smem + L.probs);
  T* dscores = reinterpret_cast<T*>(smem + L.dscores);
  float* dk = reinterpret_cast<float*>(smem + L.dk);
  float* dv = reinterpret_cast<float*>(smem + L.dv);
  float* dq = reinterpret_cast<float*>(smem + L.dq);
  float* lse = reinterpret_cast<float*>(smem + L.lse);
  float* delta = reinterpret_cast<float*>(smem + L.delta);

  const int h = blockIdx.x % p.heads, t = blockIdx.x / p.heads % p.frames, b = blockIdx.x / p.heads / p.frames;
  const int col0 = blockIdx.y * BN;
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), dout(p.dout), dk_out(p.dk_s), dv_out(p.dv_s);

  load_tile<T, SPATIAL_THREADS>(k_tile, L.ld_qkv, k, b, t, h, col0, BN, Dp, S, D);
  load_tile<T, SPATIAL_THREADS>(v_tile, L.ld_qkv, v, b, t, h, col0, BN, Dp, S, D);
  for (int i = threadIdx.x; i < BN * Dp; i += SPATIAL_THREADS) {
    dk[i / Dp * L.ld_grad + i % Dp] = 0.f;
    dv[i / Dp * L.ld_grad + i % Dp] = 0.f;
  }
  for (int row0 = 0; row0 < S; row0 += BM) {
    __syncthreads();  // the previous block is done with q_tile, dout_tile, dq
    load_tile<T, SPATIAL_THREADS>(q_tile, L.ld_qkv, q, b, t, h, row0, BM, Dp, S, D);
    load_tile<T, SPATIAL_THREADS>(dout_tile, L.ld_qkv, dout, b, t, h, row0, BM, Dp, S, D);
    for (int r = threadIdx.x; r < BM; r += SPATIAL_THREADS) {
      const bool valid = row0 + r < S;
      lse[r] = valid ? p.lse_s[stat_index(p, b, t, h, row0 + r)] : 0.f;
      delta[r] = valid ? p.delta_s[stat_index(p, b, t, h, row0 + r)] : 0.f;
    }
    __syncthreads();
    BlockGemm<T, false, true, SPATIAL_WARPS>::run(scores, L.ld_scores, q_tile, L.ld_qkv, k_tile, L.ld_qkv, BM, BN,
                                                  Dp, false);
    BlockGemm<T, false, true, SPATIAL_WARPS>::run(dprobs, L.ld_scores, dout_tile, L.ld_qkv, v_tile, L.ld_qkv, BM,
                                                  BN, Dp, false);
    __syncthreads();
    for (int i = threadIdx.x; i < BM * BN; i += SPATIAL_THREADS) {
      const int r = i / BN, c = i % BN;
      const bool valid = row0 + r < S && col0 + c < S;
      const float prob = valid ? probability(scores[r * L.ld_scores + c] * p.scale - lse[r]) : 0.f;
      probs[r * L.ld_probs + c] = from_float<T>(prob);
      dscores[r * L.ld_probs + c] = from_float<T>(prob * (dprobs[r * L.ld_scores + c] - delta[r]));
    }
    __syncthreads();
    BlockGemm<T, true, false, SPATIAL_WARPS>::run(dv, L.ld_grad, probs, L.ld_probs, dout_tile, L.ld_qkv, BN, Dp,
                                                  BM, true);
    BlockGemm<T, true, false, SPATIAL_WARPS>::run(dk, L.ld_grad, dscores, L.ld_probs, q_tile, L.ld_qkv, BN, Dp,
                                                  BM, true);
    BlockGemm<T, false, false, SPATIAL_WARPS>::run(dq, L.ld_grad, dscores, L.ld_probs, k_tile, L.ld_qkv, BM, Dp,
                                                   BN, false);
    __syncthreads();
    for (int i = threadIdx.x; i < BM * D; i += SPATIAL_THREADS) {
      const int r = i / D, c = i % D;
      if (row0 + r < S) atomicAdd(p.dq_accum + accum_index(p, b, t, row0 + r, h) + c, dq[r * L.ld_grad + c] * p.scale);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < BN * D; i += SPATIAL_THREADS) {
    const int r = i / D, c = i % D;
    if (col0 + r >= S) continue;
    dk_out.at(b, t, col0 + r, h)[c] = from_float<T>(dk[r * L.ld_grad + c] * p.scale);
    dv_out.at(b, t, col0 + r, h)[c] = from_float<T>(dv[r * L.ld_grad + c]);
  }
}

template <typename T, int BLOCK>
const char* launch(const AttentionParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = spatial_bwd_kernel<T, BLOCK, BLOCK>;
  if (const cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      error != cudaSuccess)
    return cudaGetErrorString(error);
  const dim3 grid(static_cast<unsigned>(p.batch) * p.frames * p.heads, (p.tokens + BLOCK - 1) / BLOCK);
  kernel<<<grid, SPATIAL_THREADS, smem, stream>>>(p);
  return launch_error();
}

template <typename T>
const char* launch_all(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.frames * p.tokens * p.heads;
  const unsigned row_blocks = static_cast<unsigned>((rows * 32 + ROW_THREADS - 1) / ROW_THREADS);
  spatial_bwd_preprocess_kernel<T><<<row_blocks, ROW_THREADS, 0, stream>>>(p);
  if (const char* error = launch_error()) return error;

  const int Dp = padded_head_dim(p.head_dim);
  const size_t limit = static_cast<size_t>(max_shared_memory());
  const auto smem = [&](int block) { return BackwardSmem(sizeof(T), block, block, Dp).bytes; };
  if (const char* error = PYCHOP_SPATIAL_BLOCK_SWITCH(  // the largest block that fits: head_dim_switch.h
          smem, limit, "spatial backward: not enough shared memory for this head dim",
          [&] { return launch<T, BLOCK>(p, smem(BLOCK), stream); }))
    return error;

  spatial_dq_cast_kernel<T><<<row_blocks, ROW_THREADS, 0, stream>>>(p);
  return launch_error();
}

}  // namespace

const char* launch_spatial_bwd(const AttentionParams& p, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return launch_all<decltype(tag)>(p, static_cast<cudaStream_t>(stream)); });
}

}  // namespace cuda
}  // namespace pychop

// Spatial branch, forward: per frame-head (b, t, h) and block of BM query tokens, flash-attention over the S
// tokens of the frame in blocks of BN keys, with an online softmax in float32. Scores S = Q K^T and the
// update O += P V run on tensor cores (WMMA, fp32 accumulation) for half and bfloat16; the head dim is
// padded with zeros to a multiple of 16 in shared memory.
#include "attention/cuda/block_gemm.cuh"
#include "attention/cuda/branches.h"
#include "attention/cuda/head_dim_switch.h"
#include "attention/cuda/spatial_layout.cuh"

namespace pychop {
namespace cuda {
namespace {

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(SPATIAL_THREADS) spatial_fwd_kernel(const AttentionParams p, bool accumulate) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = p.tokens, D = p.head_dim, Dp = padded_head_dim(D);
  const ForwardSmem L(sizeof(T), BM, BN, Dp);
  T* q_tile = reinterpret_cast<T*>(smem + L.q);
  T* k_tile = reinterpret_cast<T*>(smem + L.k);
  T* v_tile = reinterpret_cast<T*>(smem + L.v);
  float* scores = reinterpret_cast<float*>(smem + L.scores);
  T* probs = reinterpret_cast<T*>(smem + L.probs);
  float* acc = reinterpret_cast<float*>(smem + L.out);
  float* row_max = reinterpret_cast<float*>(smem + L.row_max);
  float* row_sum = reinterpret_cast<float*>(smem + L.row_sum);

  const int h = blockIdx.x % p.heads, t = blockIdx.x / p.heads % p.frames, b = blockIdx.x / p.heads / p.frames;
  const int row0 = blockIdx.y * BM, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), out(p.out);

  load_tile<T, SPATIAL_THREADS>(q_tile, L.ld_qkv, q, b, t, h, row0, BM, Dp, S, D);
  for (int i = threadIdx.x; i < BM * Dp; i += SPATIAL_THREADS) acc[i / Dp * L.ld_out + i % Dp] = 0.f;
  for (int i = threadIdx.x; i < BM; i += SPATIAL_THREADS) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  for (int col0 = 0; col0 < S; col0 += BN) {
    __syncthreads();  // the previous block's P V has read k_tile, v_tile, probs
    load_tile<T, SPATIAL_THREADS>(k_tile, L.ld_qkv, k, b, t, h, col0, BN, Dp, S, D);
    load_tile<T, SPATIAL_THREADS>(v_tile, L.ld_qkv, v, b, t, h, col0, BN, Dp, S, D);
    __syncthreads();
    BlockGemm<T, false, true, SPATIAL_WARPS>::run(scores, L.ld_scores, q_tile, L.ld_qkv, k_tile, L.ld_qkv, BM, BN,
                                                  Dp, false);
    __syncthreads();
    for (int r = warp; r < BM; r += SPATIAL_WARPS) {  // online softmax, a warp per row
      float block_max = -INFINITY;
      for (int j = lane; j < BN; j += 32)
        if (col0 + j < S) block_max = fmaxf(block_max, scores[r * L.ld_scores + j] * p.scale);
      const float old_max = row_max[r], new_max = fmaxf(old_max, group_max(block_max, 32));
      float block_sum = 0.f;
      for (int j = lane; j < BN; j += 32) {
        const float prob = col0 + j < S ? __expf(scores[r * L.ld_scores + j] * p.scale - new_max) : 0.f;
        probs[r * L.ld_probs + j] = from_float<T>(prob);
        block_sum += prob;
      }
      block_sum = group_sum(block_sum, 32);
      const float rescale = __expf(old_max - new_max);
      for (int c = lane; c < Dp; c += 32) acc[r * L.ld_out + c] *= rescale;
      __syncwarp();
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * rescale + block_sum;
      }
    }
    __syncthreads();
    BlockGemm<T, false, false, SPATIAL_WARPS>::run(acc, L.ld_out, probs, L.ld_probs, v_tile, L.ld_qkv, BM, Dp, BN,
                                                   true);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < BM * D; i += SPATIAL_THREADS) {
    const int r = i / D, c = i % D;
    if (row0 + r >= S) continue;
    T* dst = out.at(b, t, row0 + r, h) + c;
    float value = acc[r * L.ld_out + c] / row_sum[r];
    if (accumulate) value += to_float(*dst);
    *dst = from_float<T>(value);
  }
  for (int r = threadIdx.x; r < BM; r += SPATIAL_THREADS)
    if (row0 + r < S) p.lse_s[stat_index(p, b, t, h, row0 + r)] = row_max[r] + __logf(row_sum[r]);
}

template <typename T, int BLOCK>
const char* launch(const AttentionParams& p, bool accumulate, size_t smem, cudaStream_t stream) {
  auto kernel = spatial_fwd_kernel<T, BLOCK, BLOCK>;
  if (const cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      error != cudaSuccess)
    return cudaGetErrorString(error);
  const dim3 grid(static_cast<unsigned>(p.batch) * p.frames * p.heads, (p.tokens + BLOCK - 1) / BLOCK);
  kernel<<<grid, SPATIAL_THREADS, smem, stream>>>(p, accumulate);
  return launch_error();
}

// The largest block whose shared memory fits the device: head_dim_switch.h.
template <typename T>
const char* launch_for_shared_memory(const AttentionParams& p, bool accumulate, cudaStream_t stream) {
  const int Dp = padded_head_dim(p.head_dim);
  const size_t limit = static_cast<size_t>(max_shared_memory());
  const auto smem = [&](int block) { return ForwardSmem(sizeof(T), block, block, Dp).bytes; };
  return PYCHOP_SPATIAL_BLOCK_SWITCH(smem, limit, "spatial forward: not enough shared memory for this head dim",
                                     [&] { return launch<T, BLOCK>(p, accumulate, smem(BLOCK), stream); });
}

}  // namespace

const char* launch_spatial_fwd(const AttentionParams& p, bool accumulate, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch_for_shared_memory<decltype(tag)>(p, accumulate, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace pychop

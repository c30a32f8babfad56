// One branch's forward (branch.h), spatial and temporal alike: per problem and block of BLOCK query rows, flash
// attention over the key rows the block attends to (the causal and window masks skip whole key blocks), in
// blocks of BLOCK keys, with an online softmax in float32. Scores S = Q K^T and O += P V run on tensor cores
// (WMMA, fp32 accumulation) for half and bfloat16, on CUDA cores for float32; the head dim is padded with zeros
// to a multiple of 16 in shared memory. Rows enter by 16-byte cp.async where aligned (tile_io.cuh).
//
// Grid: one block per (problem, query block), query blocks fastest: the blocks that read a problem's keys and
// values run side by side and share them through L2. A temporal problem of T <= 64 frames is one block: its
// keys and values are read once.
#include <climits>

#include "attention/cuda/attention_layout.h"
#include "attention/cuda/block_gemm.cuh"
#include "attention/cuda/branches.h"
#include "attention/cuda/head_dim_switch.h"
#include "attention/cuda/tile_io.cuh"

namespace pychop {
namespace cuda {
namespace {

// With `add`, out += o (out holds the other branch's output; the sum rounded once); else out = o.
template <typename T, int BLOCK>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) attention_fwd_kernel(const Branch br, bool add) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int L = br.rows, D = br.head_dim, Dp = padded_head_dim(D);
  const ForwardSmem S(sizeof(T), BLOCK, Dp);
  T* q_tile = reinterpret_cast<T*>(smem + S.q);
  T* k_tile = reinterpret_cast<T*>(smem + S.k);
  T* v_tile = reinterpret_cast<T*>(smem + S.v);
  float* scores = reinterpret_cast<float*>(smem + S.scores);
  T* probs = reinterpret_cast<T*>(smem + S.probs);
  float* acc = reinterpret_cast<float*>(smem + S.out);
  float* row_max = reinterpret_cast<float*>(smem + S.row_max);
  float* row_sum = reinterpret_cast<float*>(smem + S.row_sum);

  const int query_blocks = (L + BLOCK - 1) / BLOCK;
  int b, x, h;
  br.problem(blockIdx.x / query_blocks, b, x, h);
  const int row0 = blockIdx.x % query_blocks * BLOCK, warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile<T, BLOCK, THREADS>(q_tile, S.ld_qkv, br.q, b, x, h, row0, L, Dp, D);
  for (int i = threadIdx.x; i < BLOCK; i += THREADS) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  int first_key, last_key;
  br.key_range(row0, min(row0 + BLOCK, L) - 1, first_key, last_key);
  const int first_col0 = first_key / BLOCK * BLOCK;
  for (int col0 = first_col0; col0 <= last_key; col0 += BLOCK) {
    const bool first_block = col0 == first_col0;  // acc is not there yet: nothing to rescale or add to
    __syncthreads();  // the previous block's P V has read k_tile, v_tile, probs
    load_tile<T, BLOCK, THREADS>(k_tile, S.ld_qkv, br.k, b, x, h, col0, L, Dp, D);
    load_tile<T, BLOCK, THREADS>(v_tile, S.ld_qkv, br.v, b, x, h, col0, L, Dp, D);
    wait_async_copies();
    __syncthreads();
    BlockGemm<T, false, true, WARPS>::run(scores, S.ld_scores, q_tile, S.ld_qkv, k_tile, S.ld_qkv, BLOCK, BLOCK, Dp,
                                          false);
    __syncthreads();
    for (int r = warp; r < BLOCK; r += WARPS) {  // online softmax, a warp per row
      int first, last;
      attended_range(br.causal, br.window, L, row0 + r, first, last);
      const auto attended = [&](int j) { return first <= col0 + j && col0 + j <= last && col0 + j < L; };
      float block_max = -INFINITY;
      for (int j = lane; j < BLOCK; j += 32)
        if (attended(j)) block_max = fmaxf(block_max, scores[r * S.ld_scores + j] * br.scale);
      const float old_max = row_max[r], new_max = fmaxf(old_max, group_max(block_max, 32));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // a row that has attended no key yet
      float block_sum = 0.f;
      for (int j = lane; j < BLOCK; j += 32) {
        const float prob = attended(j) ? __expf(scores[r * S.ld_scores + j] * br.scale - base) : 0.f;
        probs[r * S.ld_probs + j] = from_float<T>(prob);
        block_sum += prob;
      }
      block_sum = group_sum(block_sum, 32);
      const float rescale = __expf(old_max - base);
      if (!first_block)
        for (int c = lane; c < Dp; c += 32) acc[r * S.ld_out + c] *= rescale;
      __syncwarp();
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * rescale + block_sum;
      }
    }
    __syncthreads();
    BlockGemm<T, false, false, WARPS>::run(acc, S.ld_out, probs, S.ld_probs, v_tile, S.ld_qkv, BLOCK, Dp, BLOCK,
                                           !first_block);
  }
  __syncthreads();
  store_rows<T, BLOCK, THREADS>(br.out, b, x, h, row0, L, 0, D, add,
                                [&](int r, int c) { return acc[r * S.ld_out + c] / row_sum[r]; });
  for (int r = threadIdx.x; r < BLOCK && row0 + r < L; r += THREADS)
    static_cast<float*>(br.lse.data)[br.lse.row_offset(b, x, h, row0 + r)] = row_max[r] + __logf(row_sum[r]);
}

template <typename T>
const char* launch(const Branch& br, bool add, cudaStream_t stream) {
  int limit = 0;
  if (const char* error = max_shared_memory(limit)) return error;
  const int Dp = padded_head_dim(br.head_dim);
  const auto bytes = [&](int block) { return ForwardSmem(sizeof(T), block, Dp).bytes; };
  return dispatch_block(forward_block(sizeof(T), br.rows, Dp, static_cast<size_t>(limit)), [&](auto tag) -> const char* {
    constexpr int BLOCK = decltype(tag)::value;
    const auto kernel = attention_fwd_kernel<T, BLOCK>;
    if (const char* error = allow_shared_memory(kernel, bytes(BLOCK))) return error;
    const int64_t blocks = br.problems() * ((br.rows + BLOCK - 1) / BLOCK);
    if (blocks > INT_MAX) return "pychop: attention forward: more than 2**31 - 1 blocks";
    kernel<<<static_cast<unsigned>(blocks), THREADS, bytes(BLOCK), stream>>>(br, add);
    return launch_error();
  });
}

}  // namespace

const char* launch_branch_fwd(const Branch& br, ScalarKind dtype, bool add, void* stream) {
  return dispatch_dtype(dtype,
                        [&](auto tag) { return launch<decltype(tag)>(br, add, static_cast<cudaStream_t>(stream)); });
}

}  // namespace cuda
}  // namespace pychop

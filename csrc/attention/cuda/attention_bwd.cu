// One branch's backward (branch.h), spatial and temporal alike, FlashAttention-2's split into a key kernel and a
// query kernel, with no atomics: deterministic.
//
// Key kernel: per problem and block of BLOCK key rows, a loop over the blocks of BLOCK query rows attending to
// them; it recomputes P = exp(scale Q K^T - lse) and dP = dO V^T, forms dS = P (dP - delta), and accumulates
// dV += P^T dO and dK += dS^T Q in shared memory (the grad window zeroes P and dS of the detached pairs first).
// When one key block holds every row of a problem (a temporal problem of T <= 64 frames; S <= 64 tokens), it is
// the whole backward, one pass: each input is read once, delta = rowsum(P dP) is taken in the kernel (exact,
// from float32 P), and dQ = dS K is complete and written.
//
// Otherwise the query kernel comes first: per problem and block of BLOCK query rows, a loop over the key blocks
// they attend to, dQ += dS K. Its delta is rowsum(dO * o) from the branch's own saved output (as FlashAttention
// takes it, delta_from_output_kernel), or, where only the rounded sum of both branches was saved, rowsum(P dP)
// from a first loop over the key blocks (exact); it leaves delta for the key kernel.
//
// Where even 16-row blocks do not fit the device's shared memory (float32 with D >= 208 on a 99 KiB GPU), the key
// kernel's gradient columns are split over 2 or 4 blocks, each recomputing P and dS.
#include <climits>

#include "attention/cuda/attention_layout.h"
#include "attention/cuda/block_gemm.cuh"
#include "attention/cuda/branches.h"
#include "attention/cuda/head_dim_switch.h"
#include "attention/cuda/tile_io.cuh"

namespace pychop {
namespace cuda {
namespace {

constexpr int ROW_THREADS = 128;  // the row kernels: a warp per row

__device__ __forceinline__ bool row_of_warp(const Branch& br, int& b, int& x, int& h, int& i) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * ROW_THREADS + threadIdx.x) / 32;
  if (row >= br.problems() * br.rows) return false;  // whole warps
  br.problem(row / br.rows, b, x, h);
  i = static_cast<int>(row % br.rows);
  return true;
}

// delta = rowsum(dout * out) for the branch's own saved output.
template <typename T>
__global__ void __launch_bounds__(ROW_THREADS) delta_from_output_kernel(const Branch br) {
  int b, x, h, i;
  if (!row_of_warp(br, b, x, h, i)) return;
  const T* o = static_cast<const T*>(br.out.data) + br.out.row_offset(b, x, h, i);
  const T* g = static_cast<const T*>(br.dout.data) + br.dout.row_offset(b, x, h, i);
  float sum = 0.f;
  for (int c = threadIdx.x % 32; c < br.head_dim; c += 32) sum += to_float(o[c]) * to_float(g[c]);
  sum = group_sum(sum, 32);
  if (threadIdx.x % 32 == 0) static_cast<float*>(br.delta.data)[br.delta.row_offset(b, x, h, i)] = sum;
}

// P of row r (query row0 + r) and key column c (key col0 + c) from the scaled score: 0 outside the masks.
__device__ __forceinline__ float probability(const Branch& br, float score, float lse, int i, int j, int first,
                                            int last) {
  const bool attended = i < br.rows && first <= j && j <= last && j < br.rows;
  return attended ? recomputed_probability(score * br.scale - lse) : 0.f;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) attention_bwd_query_kernel(const Branch br, bool compute_delta) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int L = br.rows, D = br.head_dim, Dp = padded_head_dim(D);
  const QuerySmem S(sizeof(T), BLOCK, Dp);
  T* q_tile = reinterpret_cast<T*>(smem + S.q);
  T* dout_tile = reinterpret_cast<T*>(smem + S.dout);
  T* k_tile = reinterpret_cast<T*>(smem + S.k);
  T* v_tile = reinterpret_cast<T*>(smem + S.v);
  float* scores = reinterpret_cast<float*>(smem + S.scores);
  float* dprobs = reinterpret_cast<float*>(smem + S.dprobs);
  T* dscores = reinterpret_cast<T*>(smem + S.dscores);
  float* dq = reinterpret_cast<float*>(smem + S.dq);
  float* lse = reinterpret_cast<float*>(smem + S.lse);
  float* delta = reinterpret_cast<float*>(smem + S.delta);

  const int query_blocks = (L + BLOCK - 1) / BLOCK;
  int b, x, h;
  br.problem(blockIdx.x / query_blocks, b, x, h);
  const int row0 = blockIdx.x % query_blocks * BLOCK, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* delta_out = static_cast<float*>(br.delta.data);

  load_tile<T, BLOCK, THREADS>(q_tile, S.ld_qkv, br.q, b, x, h, row0, L, Dp, D);
  load_tile<T, BLOCK, THREADS>(dout_tile, S.ld_qkv, br.dout, b, x, h, row0, L, Dp, D);
  for (int r = threadIdx.x; r < BLOCK; r += THREADS) {
    const bool valid = row0 + r < L;
    lse[r] = valid ? static_cast<const float*>(br.lse.data)[br.lse.row_offset(b, x, h, row0 + r)] : 0.f;
    delta[r] = valid && !compute_delta ? delta_out[br.delta.row_offset(b, x, h, row0 + r)] : 0.f;
  }
  for (int i = threadIdx.x; i < BLOCK * Dp; i += THREADS) dq[i / Dp * S.ld_grad + i % Dp] = 0.f;
  int first_key, last_key;
  br.key_range(row0, min(row0 + BLOCK, L) - 1, first_key, last_key);
  for (int pass = compute_delta ? 0 : 1; pass < 2; ++pass) {  // 0: delta = rowsum(P dP); 1: dq
    for (int col0 = first_key / BLOCK * BLOCK; col0 <= last_key; col0 += BLOCK) {
      __syncthreads();  // the previous key block is done with k_tile, v_tile, dscores
      load_tile<T, BLOCK, THREADS>(k_tile, S.ld_qkv, br.k, b, x, h, col0, L, Dp, D);
      load_tile<T, BLOCK, THREADS>(v_tile, S.ld_qkv, br.v, b, x, h, col0, L, Dp, D);
      wait_async_copies();
      __syncthreads();
      BlockGemm<T, false, true, WARPS>::run(scores, S.ld_scores, q_tile, S.ld_qkv, k_tile, S.ld_qkv, BLOCK, BLOCK,
                                            Dp, false);
      BlockGemm<T, false, true, WARPS>::run(dprobs, S.ld_scores, dout_tile, S.ld_qkv, v_tile, S.ld_qkv, BLOCK,
                                            BLOCK, Dp, false);
      __syncthreads();
      for (int r = warp; r < BLOCK; r += WARPS) {  // a warp per query row
        int first, last;
        attended_range(br.causal, br.window, L, row0 + r, first, last);
        float p_dp = 0.f;
        for (int c = lane; c < BLOCK; c += 32) {
          const float p = probability(br, scores[r * S.ld_scores + c], lse[r], row0 + r, col0 + c, first, last);
          if (pass == 0)
            p_dp += p * dprobs[r * S.ld_scores + c];
          else
            dscores[r * S.ld_probs + c] = from_float<T>(p * (dprobs[r * S.ld_scores + c] - delta[r]));
        }
        if (pass == 0) {
          p_dp = group_sum(p_dp, 32);
          if (lane == 0) delta[r] += p_dp;
        }
      }
      if (pass == 0) continue;
      __syncthreads();
      BlockGemm<T, false, false, WARPS>::run(dq, S.ld_grad, dscores, S.ld_probs, k_tile, S.ld_qkv, BLOCK, Dp, BLOCK,
                                             true);
    }
    if (pass == 0)  // the key kernel's delta (each row's, written by the warp that summed it)
      for (int r = warp; r < BLOCK && row0 + r < L; r += WARPS)
        if (lane == 0) delta_out[br.delta.row_offset(b, x, h, row0 + r)] = delta[r];
  }
  __syncthreads();
  store_rows<T, BLOCK, THREADS>(br.dq, b, x, h, row0, L, 0, D, false,
                                [&](int r, int c) { return dq[r * S.ld_grad + c] * br.scale; });
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) attention_bwd_kernel(const Branch br, int splits, bool one_key_block) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int L = br.rows, D = br.head_dim, Dp = padded_head_dim(D), Dc = slice_cols(Dp, splits);
  const BackwardSmem S(sizeof(T), BLOCK, Dp, Dc, one_key_block);
  T* k_tile = reinterpret_cast<T*>(smem + S.k);
  T* v_tile = reinterpret_cast<T*>(smem + S.v);
  T* q_tile = reinterpret_cast<T*>(smem + S.q);
  T* dout_tile = reinterpret_cast<T*>(smem + S.dout);
  float* scores = reinterpret_cast<float*>(smem + S.scores);  // then P, in float32; one pass: then dv, dk
  float* dprobs = reinterpret_cast<float*>(smem + S.dprobs);  // one pass: then (partly) dq
  T* probs = reinterpret_cast<T*>(smem + S.probs);            // P of the live pairs
  T* dscores = reinterpret_cast<T*>(smem + S.dscores);
  float* dk = reinterpret_cast<float*>(smem + S.dk);
  float* dv = reinterpret_cast<float*>(smem + S.dv);
  float* dq = reinterpret_cast<float*>(smem + S.dq);
  float* lse = reinterpret_cast<float*>(smem + S.lse);
  float* delta = reinterpret_cast<float*>(smem + S.delta);

  const int key_blocks = (L + BLOCK - 1) / BLOCK, split = blockIdx.x % splits;
  const int64_t key_block = blockIdx.x / splits;
  int b, x, h;
  br.problem(key_block / key_blocks, b, x, h);
  const int col0 = static_cast<int>(key_block % key_blocks) * BLOCK, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c0 = split * Dc, cols = min(Dc, Dp - c0);  // this block's columns of dq, dk, dv
  const int c1 = min(c0 + cols, D);                    // of which inside the head dim

  load_tile<T, BLOCK, THREADS>(k_tile, S.ld_qkv, br.k, b, x, h, col0, L, Dp, D);
  load_tile<T, BLOCK, THREADS>(v_tile, S.ld_qkv, br.v, b, x, h, col0, L, Dp, D);
  if (!one_key_block)  // else there is one query block, and nothing to accumulate
    for (int i = threadIdx.x; i < BLOCK * cols; i += THREADS) {
      dk[i / cols * S.ld_grad + i % cols] = 0.f;
      dv[i / cols * S.ld_grad + i % cols] = 0.f;
    }
  int first_query, last_query;
  br.query_range(col0, min(col0 + BLOCK, L) - 1, first_query, last_query);
  for (int row0 = first_query / BLOCK * BLOCK; row0 <= last_query; row0 += BLOCK) {
    __syncthreads();  // the previous query block is done with q_tile, dout_tile, dq
    load_tile<T, BLOCK, THREADS>(q_tile, S.ld_qkv, br.q, b, x, h, row0, L, Dp, D);
    load_tile<T, BLOCK, THREADS>(dout_tile, S.ld_qkv, br.dout, b, x, h, row0, L, Dp, D);
    for (int r = threadIdx.x; r < BLOCK; r += THREADS) {
      const bool valid = row0 + r < L;
      lse[r] = valid ? static_cast<const float*>(br.lse.data)[br.lse.row_offset(b, x, h, row0 + r)] : 0.f;
      if (!one_key_block)
        delta[r] = valid ? static_cast<const float*>(br.delta.data)[br.delta.row_offset(b, x, h, row0 + r)] : 0.f;
    }
    wait_async_copies();
    __syncthreads();
    BlockGemm<T, false, true, WARPS>::run(scores, S.ld_scores, q_tile, S.ld_qkv, k_tile, S.ld_qkv, BLOCK, BLOCK, Dp,
                                          false);
    BlockGemm<T, false, true, WARPS>::run(dprobs, S.ld_scores, dout_tile, S.ld_qkv, v_tile, S.ld_qkv, BLOCK, BLOCK,
                                          Dp, false);
    __syncthreads();
    for (int r = warp; r < BLOCK; r += WARPS) {  // P, delta, dS: a warp per query row
      const int i = row0 + r;
      int first, last;
      attended_range(br.causal, br.window, L, i, first, last);
      const int first_live = first_live_row(br.grad_window, i, first);
      float p_dp = 0.f;
      for (int c = lane; c < BLOCK; c += 32) {
        const int j = col0 + c;
        const float p = probability(br, scores[r * S.ld_scores + c], lse[r], i, j, first, last);
        scores[r * S.ld_scores + c] = p;
        p_dp += p * dprobs[r * S.ld_scores + c];
      }
      const float delta_r = one_key_block ? group_sum(p_dp, 32) : delta[r];  // the kernel's own: every key is here
      for (int c = lane; c < BLOCK; c += 32) {
        const float p = scores[r * S.ld_scores + c];
        probs[r * S.ld_probs + c] = from_float<T>(col0 + c >= first_live ? p : 0.f);
        dscores[r * S.ld_probs + c] = from_float<T>(p * (dprobs[r * S.ld_scores + c] - delta_r));
      }
    }
    __syncthreads();
    BlockGemm<T, true, false, WARPS>::run(dv, S.ld_grad, probs, S.ld_probs, dout_tile + c0, S.ld_qkv, BLOCK, cols,
                                          BLOCK, !one_key_block);
    if (one_key_block)
      BlockGemm<T, false, false, WARPS>::run(dq, S.ld_grad, dscores, S.ld_probs, k_tile + c0, S.ld_qkv, BLOCK, cols,
                                             BLOCK, false);
    const bool detaches = br.detaches_any(min(row0 + BLOCK, L) - 1, col0);
    if (one_key_block || detaches) __syncthreads();
    if (one_key_block) {  // dv and dq out, before dk takes dv's place
      store_rows<T, BLOCK, THREADS>(br.dv, b, x, h, col0, L, c0, c1, false,
                                    [&](int r, int c) { return dv[r * S.ld_grad + c - c0]; });
      store_rows<T, BLOCK, THREADS>(br.dq, b, x, h, row0, L, c0, c1, false,
                                    [&](int r, int c) { return dq[r * S.ld_grad + c - c0] * br.scale; });
    }
    if (detaches) {  // dk takes dS of the live pairs only
      for (int r = warp; r < BLOCK; r += WARPS) {
        int first, last;
        attended_range(br.causal, br.window, L, row0 + r, first, last);
        const int first_live = first_live_row(br.grad_window, row0 + r, first);
        for (int c = lane; c < BLOCK; c += 32)
          if (col0 + c < first_live) dscores[r * S.ld_probs + c] = from_float<T>(0.f);
      }
    }
    if (one_key_block || detaches) __syncthreads();
    BlockGemm<T, true, false, WARPS>::run(dk, S.ld_grad, dscores, S.ld_probs, q_tile + c0, S.ld_qkv, BLOCK, cols,
                                          BLOCK, !one_key_block);
  }
  __syncthreads();
  store_rows<T, BLOCK, THREADS>(br.dk, b, x, h, col0, L, c0, c1, false,
                                [&](int r, int c) { return dk[r * S.ld_grad + c - c0] * br.scale; });
  if (!one_key_block)
    store_rows<T, BLOCK, THREADS>(br.dv, b, x, h, col0, L, c0, c1, false,
                                  [&](int r, int c) { return dv[r * S.ld_grad + c - c0]; });
}

// The device's backward plan for `br` (attention_layout.h).
template <typename T>
const char* plan(const Branch& br, BackwardPlan& plan) {
  int limit = 0;
  if (const char* error = max_shared_memory(limit)) return error;
  plan = backward_plan(sizeof(T), br.rows, padded_head_dim(br.head_dim), static_cast<size_t>(limit));
  return nullptr;
}

// dq, and the key kernel's delta, for a problem that spans several key blocks.
template <typename T>
const char* launch_query_kernel(const Branch& br, bool output_saved, cudaStream_t stream) {
  if (output_saved) {
    const int64_t row_blocks = (br.problems() * br.rows * 32 + ROW_THREADS - 1) / ROW_THREADS;
    if (row_blocks > INT_MAX) return "pychop: attention backward: more than 2**31 - 1 blocks";
    delta_from_output_kernel<T><<<static_cast<unsigned>(row_blocks), ROW_THREADS, 0, stream>>>(br);
    if (const char* error = launch_error()) return error;
  }
  int limit = 0;
  if (const char* error = max_shared_memory(limit)) return error;
  const int Dp = padded_head_dim(br.head_dim);
  return dispatch_block(query_block(sizeof(T), br.rows, Dp, static_cast<size_t>(limit)), [&](auto tag) -> const char* {
    constexpr int BLOCK = decltype(tag)::value;
    const auto kernel = attention_bwd_query_kernel<T, BLOCK>;
    const size_t bytes = QuerySmem(sizeof(T), BLOCK, Dp).bytes;
    if (const char* error = allow_shared_memory(kernel, bytes)) return error;
    const int64_t blocks = br.problems() * ((br.rows + BLOCK - 1) / BLOCK);
    if (blocks > INT_MAX) return "pychop: attention backward: more than 2**31 - 1 blocks";
    kernel<<<static_cast<unsigned>(blocks), THREADS, bytes, stream>>>(br, !output_saved);
    return launch_error();
  });
}

template <typename T>
const char* launch(const Branch& br, bool output_saved, cudaStream_t stream) {
  BackwardPlan p;
  if (const char* error = plan<T>(br, p)) return error;
  const bool one_key_block = br.rows <= p.block;
  if (p.block != 0 && !one_key_block)
    if (const char* error = launch_query_kernel<T>(br, output_saved, stream)) return error;
  const int Dp = padded_head_dim(br.head_dim);
  return dispatch_block(p.block, [&](auto tag) -> const char* {
    constexpr int BLOCK = decltype(tag)::value;
    const auto kernel = attention_bwd_kernel<T, BLOCK>;
    const size_t bytes = BackwardSmem(sizeof(T), BLOCK, Dp, slice_cols(Dp, p.splits), one_key_block).bytes;
    if (const char* error = allow_shared_memory(kernel, bytes)) return error;
    const int64_t blocks = br.problems() * ((br.rows + BLOCK - 1) / BLOCK) * p.splits;
    if (blocks > INT_MAX) return "pychop: attention backward: more than 2**31 - 1 blocks";
    kernel<<<static_cast<unsigned>(blocks), THREADS, bytes, stream>>>(br, p.splits, one_key_block);
    return launch_error();
  });
}

}  // namespace

const char* launch_branch_bwd(const Branch& br, ScalarKind dtype, bool output_saved, void* stream) {
  return dispatch_dtype(
      dtype, [&](auto tag) { return launch<decltype(tag)>(br, output_saved, static_cast<cudaStream_t>(stream)); });
}

const char* backward_needs_scratch(const Branch& br, ScalarKind dtype, bool& needs) {
  BackwardPlan p;
  const char* error = dispatch_dtype(dtype, [&](auto tag) { return plan<decltype(tag)>(br, p); });
  needs = p.block == 0 || br.rows > p.block;
  return error;
}

}  // namespace cuda
}  // namespace pychop

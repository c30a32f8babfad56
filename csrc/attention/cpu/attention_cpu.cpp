// CPU kernels of the fused parallel spatial-temporal attention.
//
// Forward: the temporal pass (one task per token-head, all frames) writes lse_t and keeps o_t in float32 (in
// out itself when out is float32); then the spatial pass (one task per frame-head and block of BLOCK_Q
// tokens) writes lse_s and out = o_s + o_t, rounded once from float32. With the branches stacked each pass
// writes its own output instead (o_t to out_t, o_s to out). Backward: the temporal pass writes dq_t, dk_t,
// dv_t; the spatial pass (one task per frame-head) writes dq_s, dk_s, dv_s. Each takes its branch's delta =
// rowsum(dout * o) as rowsum(P * dP) / rowsum(P) over whole rows of its own recomputed P and dP, never from out:
// a summed 16-bit out holds o_s + o_t rounded, whose rounding would pass into the spatial gradients when o_t
// outweighs o_s (and dividing by rowsum(P) takes out the rounding of the float32 lse, normalized_delta).
//
// All arithmetic is float32. The spatial pass works on S x S blocks: float32 rows are read and written in place
// where a gemm can take them (rows at least D apart), other dtypes and strides go through float32 row copies;
// both directions scale the scores, rounded alike, so that the backward recomputes the forward's probabilities
// (P = exp(scale Q K^T - lse), dS' = scale dS, dQ = dS' K, dK^T = Q^T dS'). Its matrix products are torch's
// exported small gemm (at::native::cpublas::brgemm: oneDNN's JIT microkernel, else BLAS), one thread each; it
// takes no transpose flags, so transposed operands are copied by 8 x 8 register blocks (transpose).
//
// The temporal pass is T x T per token-head (T is 4 to 64 frames in practice), far too small for a gemm call to
// pay: it copies the token-head's frames into float32 tiles padded with zeros to multiples of 8 rows and
// columns (TemporalTiles) and works along D with 8-lane vector rows, no gemm and no transposes. Scores are
// computed transposed, eight query frames against one key frame at a time (dots8), so that the softmax and its
// gradient run down the columns, eight query frames per vector, with no reductions across lanes; the masks are
// an additive 0 / -inf bias (TemporalBands). The products with V, K, Q and dout are weighted sums of tile rows
// (combine_rows). Measured against the gemm version (one thread, D = 64, fp32), this is faster forward and
// backward at T = 8 to 32 and forward+backward still at T = 64, where the forward alone is about 10% slower.
// At T = 8 moving the rows costs as much as the arithmetic: every tensor is read in T streams a frame apart,
// which the pass prefetches a few token-heads ahead (prefetch_frames), and rows not read again in the call are
// written by streaming stores (stream_rows).
//
// Threads are torch's (at::parallel_for), taking runs of tasks from a shared counter (run_tasks). The row kernels
// (softmax, its gradient, transpose, the temporal tiles) are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2,
// FMA) and baseline x86-64 (GCC 12 and later; older GCC: AVX-512F, AVX2 and baseline), the best picked at load
// time; the rest is compiled once.
#include "attention/kernels.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define PYCHOP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// ISA levels as clones came in GCC 12; before it, single features (the AVX2 clone then lacks FMA).
#define PYCHOP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYCHOP_CPU_CLONES
#endif
#define PYCHOP_INLINE inline __attribute__((always_inline))

namespace pychop {
namespace {

constexpr int BLOCK_Q = 64;       // query rows per spatial gemm, forward
constexpr int BLOCK_Q_BWD = 128;  // and backward (fewer passes over the D x S accumulators dK^T, dV^T)

// Orders the calling thread's streaming stores (stream_rows) before whatever it does next.
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Runs body(buffers, task) for every task in [0, tasks) on torch's threads, each thread with its own
// Buffers(p) and ending with stream_fence. Tasks go out from a shared counter in runs of consecutive ones (a
// multiple of `unit`, about 16 runs per thread), so that a thread the OS deschedules (other processes on the
// cores) leaves the rest of its share to the others instead of holding up the call. A thread is woken only for
// about 4 MFLOP of work (tens of microseconds), so small calls run on the calling thread instead of paying for
// a parallel region.
template <typename Buffers, typename Body>
void run_tasks(const AttentionParams& p, int64_t tasks, int64_t flops_per_task, int64_t unit, const Body& body) {
  constexpr int64_t MIN_THREAD_FLOPS = int64_t{1} << 22;
  const int64_t min_tasks = std::max<int64_t>(1, MIN_THREAD_FLOPS / std::max<int64_t>(1, flops_per_task));
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (tasks + min_tasks - 1) / min_tasks));
  const int64_t run = unit * std::max<int64_t>(1, tasks / unit / (16 * workers));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Buffers buf(p);
    for (int64_t first = next.fetch_add(run); first < tasks; first = next.fetch_add(run))
      for (int64_t task = first; task < std::min(tasks, first + run); ++task) body(buf, task);
    stream_fence();
  });
}

template <typename T>
struct Rows {  // element (b, t, s, h, 0) of a TensorRef, typed
  T* data;
  int64_t sb, st, ss, sh;
  explicit Rows(const TensorRef& r)
      : data(static_cast<T*>(r.data)), sb(r.stride_b), st(r.stride_t), ss(r.stride_s), sh(r.stride_h) {}
  PYCHOP_INLINE T* at(int b, int t, int s, int h) const { return data + b * sb + t * st + s * ss + h * sh; }
};

// Task `task` of the temporal pass: token-head (b, s, h), heads fastest.
struct TokenHead {
  int b, s, h;
  TokenHead(const AttentionParams& p, int64_t task)
      : b(static_cast<int>(task / p.heads / p.tokens)), s(static_cast<int>(task / p.heads % p.tokens)),
        h(static_cast<int>(task % p.heads)) {}
};

// Prefetches `rows` rows of `bytes` bytes, `stride` bytes apart, into the outer caches. GCC counts a prefetch as
// no side effect, takes a function of nothing else for a pure one and drops calls to it: the empty asm keeps it.
inline void prefetch_rows(const char* first, int64_t stride, int rows, int bytes) {
  asm volatile("");
  for (int r = 0; r < rows; ++r)
    for (int offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + r * stride + offset, 0, 1);
}

constexpr int PREFETCH_TASKS = 4;  // how many token-heads ahead the temporal pass asks for its input rows

// Asks for rows (b, 0:T, s, h) of each tensor, token-head `task`, to be brought into the outer caches (a no-op
// past the last task). The temporal pass reads every tensor in T streams a frame apart, more than the hardware
// prefetchers follow: asked PREFETCH_TASKS token-heads ahead, the backward takes about a fifth to a third less
// time at T = 8 (one thread).
template <typename... Tensors>
void prefetch_frames(const AttentionParams& p, int64_t task, const Tensors&... tensors) {
  if (task >= static_cast<int64_t>(p.batch) * p.tokens * p.heads) return;
  const TokenHead th(p, task);
  (prefetch_rows(reinterpret_cast<const char*>(tensors.at(th.b, 0, th.s, th.h)),
                 tensors.st * static_cast<int64_t>(sizeof(*tensors.data)), p.frames,
                 p.head_dim * static_cast<int>(sizeof(*tensors.data))),
   ...);
}

// dst[r * ld + 0:D) = factor * src[r * stride + 0:D) in float32, for n rows.
template <typename T>
void load_rows(float* __restrict__ dst, int64_t ld, const T* __restrict__ src, int64_t stride, int n, int D,
               float factor = 1.f) {
  for (int r = 0; r < n; ++r)
    for (int d = 0; d < D; ++d) dst[r * ld + d] = static_cast<float>(src[r * stride + d]) * factor;
}

// n rows from src (row stride `stride`) as a float32 gemm operand, its row stride in ld: the tensor's own rows
// when it is float32 with rows at least D apart, else a float32 copy in `copy` (row stride ld_copy).
template <typename T>
const float* float_rows(const T* src, int64_t stride, int n, int D, float* copy, int64_t ld_copy, int64_t& ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride >= D) {
      ld = stride;
      return src;
    }
  }
  load_rows(copy, ld_copy, src, stride, n, D);
  ld = ld_copy;
  return copy;
}

// dst[r * stride + 0:D) = factor * src[r * ld + 0:D), rounded to T, for n rows.
template <typename T>
void store_rows(T* __restrict__ dst, int64_t stride, const float* __restrict__ src, int64_t ld, int n, int D,
                float factor = 1.f) {
  for (int r = 0; r < n; ++r)
    for (int d = 0; d < D; ++d) dst[r * stride + d] = static_cast<T>(src[r * ld + d] * factor);
}

// store_rows, by streaming (non-temporal) stores where T is float32 and the rows are 16-byte aligned: rows that
// are written once and not read again in the call then go to memory without being read for ownership, nor
// competing for the cache sets that rows a frame apart in every tensor share (the temporal backward's outputs:
// about a quarter less time at T = 8, one thread). The writer orders them with stream_fence (run_tasks does).
template <typename T>
void stream_rows(T* __restrict__ dst, int64_t stride, const float* __restrict__ src, int64_t ld, int n, int D) {
#if defined(__SSE__)
  if constexpr (std::is_same_v<T, float>) {
    if (D % 4 == 0 && stride % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(src) % 16 == 0) {
      for (int r = 0; r < n; ++r)
        for (int d = 0; d < D; d += 4) _mm_stream_ps(dst + r * stride + d, _mm_load_ps(src + r * ld + d));
      return;
    }
  }
#endif
  store_rows(dst, stride, src, ld, n, D);
}

typedef float vec8 __attribute__((vector_size(32)));
typedef int lanes8 __attribute__((vector_size(32)));

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block: unpack pairs of rows, then pairs of pairs, then halves.
PYCHOP_INLINE void transpose8x8(float* __restrict__ dst, int64_t ldd, const float* __restrict__ src, int64_t lds) {
  vec8 r[8], t[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * lds, sizeof(vec8));
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lanes8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], lanes8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], lanes8{0, 1, 8, 9, 4, 5, 12, 13});
      r[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], lanes8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int c = 0; c < 4; ++c) {
    const vec8 low = __builtin_shuffle(r[c], r[c + 4], lanes8{0, 1, 2, 3, 8, 9, 10, 11});
    const vec8 high = __builtin_shuffle(r[c], r[c + 4], lanes8{4, 5, 6, 7, 12, 13, 14, 15});
    std::memcpy(dst + c * ldd, &low, sizeof(vec8));
    std::memcpy(dst + (c + 4) * ldd, &high, sizeof(vec8));
  }
}

// dst[c * ldd + r] = src[r * lds + c]: the transpose of a rows x cols float32 matrix, in 8 x 8 register blocks.
PYCHOP_CPU_CLONES void transpose(float* __restrict__ dst, int64_t ldd, const float* __restrict__ src, int64_t lds,
                                 int rows, int cols) {
  int r = 0;
  for (; r + 8 <= rows; r += 8) {
    int c = 0;
    for (; c + 8 <= cols; c += 8) transpose8x8(dst + c * ldd + r, ldd, src + r * lds + c, lds);
    for (; c < cols; ++c)
      for (int i = 0; i < 8; ++i) dst[c * ldd + r + i] = src[(r + i) * lds + c];
  }
  for (; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// 8 partial sums, then the tail: an order that vectorizes without reassociation.
template <typename T>
PYCHOP_INLINE float dot(const float* __restrict__ x, const T* __restrict__ y, int n) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l] * static_cast<float>(y[i + l]);
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) sum += x[i] * static_cast<float>(y[i]);
  return sum;
}

PYCHOP_INLINE vec8 load8(const float* x) {
  vec8 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}

PYCHOP_INLINE void store8(float* x, vec8 v) { std::memcpy(x, &v, sizeof(v)); }

// [sum of a[0]'s lanes, ..., sum of a[7]'s lanes]: pairwise shuffles and adds, within 128-bit halves first.
PYCHOP_INLINE vec8 lane_sums(const vec8* a) {
  vec8 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i)
    pairs[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lanes8{0, 8, 1, 9, 4, 12, 5, 13}) +
               __builtin_shuffle(a[2 * i], a[2 * i + 1], lanes8{2, 10, 3, 11, 6, 14, 7, 15});
  for (int i = 0; i < 2; ++i)
    quads[i] = __builtin_shuffle(pairs[2 * i], pairs[2 * i + 1], lanes8{0, 1, 8, 9, 4, 5, 12, 13}) +
               __builtin_shuffle(pairs[2 * i], pairs[2 * i + 1], lanes8{2, 3, 10, 11, 6, 7, 14, 15});
  return __builtin_shuffle(quads[0], quads[1], lanes8{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(quads[0], quads[1], lanes8{4, 5, 6, 7, 12, 13, 14, 15});
}

// [x[0] . y, ..., x[7] . y] over [0, n), n a multiple of 8: eight rows (row stride ld) against one row, the
// products of each row summed in 8 lanes along n, then across the lanes.
PYCHOP_INLINE vec8 dots8(const float* __restrict__ x, int64_t ld, const float* __restrict__ y, int n) {
  vec8 acc[8] = {};
  for (int d = 0; d < n; d += 8) {
    const vec8 yd = load8(y + d);
    for (int j = 0; j < 8; ++j) acc[j] += load8(x + j * ld + d) * yd;
  }
  return lane_sums(acc);
}

// out[0:8V) = sum_i c[i * cs] * rows[i * ld + 0:8V) over i in [0, n): V accumulators of 8 lanes.
template <int V>
PYCHOP_INLINE void combine_block(float* __restrict__ out, const float* __restrict__ c, int64_t cs,
                                 const float* __restrict__ rows, int64_t ld, int n) {
  vec8 acc[V] = {};
  for (int i = 0; i < n; ++i) {
    const vec8 weight = vec8{} + c[i * cs];
    for (int j = 0; j < V; ++j) acc[j] += weight * load8(rows + i * ld + 8 * j);
  }
  for (int j = 0; j < V; ++j) store8(out + 8 * j, acc[j]);
}

// out[0:D) = sum_i c[i * cs] * rows[i * ld + 0:D) over i in [0, n) (zeros when n = 0), D a multiple of 8: a
// weighted sum of rows, 64 and then 8 columns at a time.
PYCHOP_INLINE void combine_rows(float* __restrict__ out, const float* __restrict__ c, int64_t cs,
                                const float* __restrict__ rows, int64_t ld, int n, int D) {
  int d = 0;
  for (; d + 64 <= D; d += 64) combine_block<8>(out + d, c, cs, rows + d, ld, n);
  for (; d < D; d += 8) combine_block<1>(out + d, c, cs, rows + d, ld, n);
}

// exp(x) for x <= 0 (scores minus their max or logsumexp), in plain arithmetic so that loops over it vectorize:
// x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 split in two for precision), exp(r) by a degree-7
// polynomial (Cephes' coefficients, about 1 ulp), 2^n assembled in the exponent bits. exp(0) is 1; below -87
// (exp(-87) ~ 1.6e-38, near the smallest normal float) the result is 0, exp(-inf) included. Above ln 2 it is 2: a
// score recomputed in the backward can exceed its logsumexp by rounding (by a lot under a huge scale), where the
// exact probability is at most 1 and the polynomial's 2^n would overflow into garbage.
PYCHOP_INLINE float exp_nonpositive(float x) {
  x = x > 0.693147181f ? 0.693147181f : x;
  const bool underflows = x < -87.f;
  x = underflows ? -87.f : x;
  constexpr float round_magic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflows ? 0.f : poly * two_n;
}

// max and sum of x[0:n), 16 lanes wide so that they vectorize (a fixed order, no reassociation needed).
PYCHOP_INLINE float max_of(const float* __restrict__ x, int n) {
  float lanes[16];
  std::fill(lanes, lanes + 16, -std::numeric_limits<float>::infinity());
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  for (int l = 0; i < n; ++i, ++l) lanes[l] = x[i] > lanes[l] ? x[i] : lanes[l];
  return *std::max_element(lanes, lanes + 16);
}

PYCHOP_INLINE float sum_of(const float* __restrict__ x, int n) {
  float lanes[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += x[i + l];
  for (int l = 0; i < n; ++i, ++l) lanes[l] += x[i];
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}

// x = softmax(scale x) over n unscaled scores; returns the logsumexp of the scaled scores. A single score gives
// exactly 1. The scaled score is scale * x, rounded as the backward rounds it (softmax_grad_rows), so that the
// backward's exp(scale s - lse) recomputes these probabilities, not ones off by the rounding of a scaled query.
PYCHOP_INLINE float softmax(float* __restrict__ x, int n, float scale) {
  for (int i = 0; i < n; ++i) x[i] *= scale;
  const float max_score = max_of(x, n);
  for (int i = 0; i < n; ++i) x[i] = exp_nonpositive(x[i] - max_score);
  const float sum = sum_of(x, n);
  const float inv = 1.f / sum;
  for (int i = 0; i < n; ++i) x[i] *= inv;
  return max_score + std::log(sum);
}

// Rows [0, rows) of the unscaled score matrix x (row stride ld, n columns) become softmax rows of the scaled
// scores; lse[i] their logsumexp.
PYCHOP_CPU_CLONES void softmax_rows(float* x, int64_t ld, int rows, int n, float scale, float* lse) {
  for (int i = 0; i < rows; ++i) lse[i] = softmax(x + i * ld, n, scale);
}

// The delta of a row from sum_j p dP and sum_j p of its recomputed probabilities. Recomputed from a float32
// logsumexp, a row's probabilities sum to 1 only within the rounding of lse (about 1e-7 |lse|); undivided, a
// nearly one-hot row's dominating key would get dS = p (dP - delta) of that rounding times dP instead of about 0,
// tens of times the torch path's error at saturated scores. A row with no probability (none attended) keeps 0.
PYCHOP_INLINE float normalized_delta(float p_dp_sum, float p_sum) { return p_sum > 0.f ? p_dp_sum / p_sum : 0.f; }

// From the unscaled scores s and dP = dO V^T of whole rows [0, rows) (row stride ld, n columns), the
// probabilities p = exp(scale s - lse[i]) (in place of s) and dS' = scale p (dP - delta) (in place of dP), where
// delta = rowsum(p dP) / rowsum(p) = dO . o_s.
PYCHOP_CPU_CLONES void softmax_grad_rows(float* p, float* dp, int64_t ld, int rows, int n, float scale,
                                         const float* lse) {
  for (int i = 0; i < rows; ++i) {
    float *pr = p + i * ld, *dr = dp + i * ld;
    float p_sum = 0.f;
    for (int j = 0; j < n; ++j) {
      pr[j] = exp_nonpositive(scale * pr[j] - lse[i]);
      p_sum += pr[j];
    }
    const float delta = normalized_delta(dot(pr, dr, n), p_sum);
    for (int j = 0; j < n; ++j) dr[j] = scale * pr[j] * (dr[j] - delta);
  }
}

// C (M x N, row stride ldc) = A (M x K, lda) B (K x N, ldb), plus C when `accumulate`; float32, row-major.
// torch's exported small-gemm entry point: oneDNN's JIT brgemm microkernel (AVX2 and up, cached per shape and
// thread), else torch's BLAS gemm. It takes no transposes: callers keep transposed copies where needed.
PYCHOP_INLINE void matmul(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float* C, int64_t ldc, bool accumulate = false) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

PYCHOP_INLINE int64_t stat_index(const AttentionParams& p, int b, int t, int h, int s) {
  return ((static_cast<int64_t>(b) * p.frames + t) * p.heads + h) * p.tokens + s;
}

PYCHOP_INLINE int padded(int n) { return (n + 15) / 16 * 16; }  // row strides of whole 64-byte lines

struct FreeFloats {
  void operator()(float* x) const { std::free(x); }
};
using FloatArray = std::unique_ptr<float[], FreeFloats>;

// n uninitialised floats, 64-byte aligned (rows padded to 16 floats then start on cache lines).
FloatArray floats(int64_t n) {
  const size_t bytes = static_cast<size_t>((n + 15) / 16 * 16) * sizeof(float);
  float* x = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  if (x == nullptr) throw std::bad_alloc();
  return FloatArray(x);
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

PYCHOP_INLINE int ceil8(int n) { return (n + 7) / 8 * 8; }

// The temporal masks, the same for every token-head, over the query frames padded to Tq = ceil8(T) (a padding
// frame attends frame 0 alone): query frame t attends key frames [first[t], last[t]] (attended_frames), and
// bias[u * Tq + t] is 0 where it attends key frame u, -inf where not (added to the scores, it zeroes their
// exponentials). Key frame u receives gradient from query frames [query_lo[u], query_hi[u]], the t < T whose
// frames from first_live_frame to last[t] hold u (a contiguous run: both ends never decrease with t).
struct TemporalBands {
  int frames, queries;  // T, Tq
  std::unique_ptr<int[]> first, last, query_lo, query_hi;
  std::unique_ptr<float[]> bias;
  explicit TemporalBands(const AttentionParams& p)
      : frames(p.frames), queries(ceil8(p.frames)), first(new int[queries]()), last(new int[queries]()),
        query_lo(new int[frames]), query_hi(new int[frames]), bias(new float[frames * queries]) {
    for (int t = 0; t < frames; ++t) attended_frames(p, t, first[t], last[t]);
    for (int u = 0; u < frames; ++u) {
      query_lo[u] = frames;
      query_hi[u] = -1;
      for (int t = frames - 1; t >= 0; --t)
        if (first_live_frame(p, t, first[t]) <= u && u <= last[t]) {
          query_lo[u] = t;
          if (query_hi[u] < 0) query_hi[u] = t;
        }
      for (int t = 0; t < queries; ++t)
        bias[u * queries + t] = first[t] <= u && u <= last[t] ? 0.f : -std::numeric_limits<float>::infinity();
    }
  }
};

// One token-head's frames as float32 tiles: Tp rows of Dp (T, D padded to 16) per tensor, padding zeros, so the
// row kernels run over Tq = ceil8(T) rows and Dv = ceil8(D) columns without remainders. Loads and stores
// convert from and to the tensors' dtype and strides.
struct TemporalTiles {
  int Dp, Tp;
  FloatArray data;
  TemporalTiles(const AttentionParams& p, int count)
      : Dp(padded(p.head_dim)), Tp(padded(p.frames)), data(floats(static_cast<int64_t>(count) * Tp * Dp)) {
    std::fill(data.get(), data.get() + static_cast<int64_t>(count) * Tp * Dp, 0.f);
  }
  float* operator[](int i) const { return data.get() + static_cast<int64_t>(i) * Tp * Dp; }
};

// st[u * ld_s + t] = scale x[t] . y[u], for key frames u < T and query frames t < Tq: eight query rows against
// each key row, along D. x, y: tiles with row stride ld and Dv columns.
PYCHOP_INLINE void temporal_scores(const TemporalBands& bands, const float* x, const float* y, int64_t ld, int Dv,
                                   float scale, float* st, int64_t ld_s) {
  for (int u = 0; u < bands.frames; ++u)
    for (int t0 = 0; t0 < bands.queries; t0 += 8)
      store8(st + u * ld_s + t0, scale * dots8(x + t0 * ld, ld, y + u * ld, Dv));
}

// The temporal attention of one token-head from its tiles q, k, v (row stride ld): the transposed scores
// st[u * ld_s + t] = scale q[t] . k[u] become P^T, the softmax over each query frame's attended key frames (zero
// elsewhere; a single frame gives exactly 1), lse[t] its logsumexp; then o[t] = sum_u P[t, u] v[u]. The softmax
// runs down the columns of st, eight query frames at a time, so that it needs no reduction across lanes.
PYCHOP_CPU_CLONES void temporal_forward_tile(const AttentionParams& p, const TemporalBands& bands, const float* q,
                                             const float* k, const float* v, float* o, int64_t ld, float* st,
                                             int64_t ld_s, float* lse) {
  const int T_ = p.frames, Dv = ceil8(p.head_dim);
  temporal_scores(bands, q, k, ld, Dv, p.scale, st, ld_s);
  for (int t0 = 0; t0 < bands.queries; t0 += 8) {
    float max_score[8], sum[8], inv[8];
    for (int j = 0; j < 8; ++j) max_score[j] = -std::numeric_limits<float>::infinity(), sum[j] = 0.f;
    for (int u = 0; u < T_; ++u) {
      float* s = st + u * ld_s + t0;
      const float* bias = bands.bias.get() + u * bands.queries + t0;
      for (int j = 0; j < 8; ++j) {
        s[j] += bias[j];
        max_score[j] = s[j] > max_score[j] ? s[j] : max_score[j];
      }
    }
    for (int u = 0; u < T_; ++u) {
      float* s = st + u * ld_s + t0;
      for (int j = 0; j < 8; ++j) {
        s[j] = exp_nonpositive(s[j] - max_score[j]);
        sum[j] += s[j];
      }
    }
    for (int j = 0; j < 8; ++j) lse[t0 + j] = max_score[j] + std::log(sum[j]), inv[j] = 1.f / sum[j];
    for (int u = 0; u < T_; ++u)
      for (int j = 0; j < 8; ++j) st[u * ld_s + t0 + j] *= inv[j];
  }
  for (int t = 0; t < T_; ++t) {
    const int first = bands.first[t];
    combine_rows(o + t * ld, st + first * ld_s + t, ld_s, v + first * ld, ld, bands.last[t] - first + 1, Dv);
  }
}

// Whether out holds o_s + o_t (both branches, not stacked): the temporal pass then leaves o_t in float32 for
// the spatial pass to add.
inline bool sums_branches(const AttentionParams& p) { return p.spatial && p.temporal && !p.stacked; }

// One thread's working memory for the temporal forward: the bands, tiles q, k, v, o, the transposed scores
// (T x Tp) and the logsumexps.
struct TemporalForwardBuffers {
  TemporalBands bands;
  TemporalTiles tiles;
  FloatArray scores, lse;
  explicit TemporalForwardBuffers(const AttentionParams& p)
      : bands(p), tiles(p, 4), scores(floats(static_cast<int64_t>(p.frames) * tiles.Tp)), lse(floats(tiles.Tp)) {}
};

// One token-head (b, s, h): o_t for all its frames, into `o_t` (float32, rows (b, t, s, h) of its strides) when
// the branches are summed, else into out_t; lse_t written.
template <typename T>
void temporal_forward_task(const AttentionParams& p, TemporalForwardBuffers& buf, const Rows<float>& o_t,
                           int64_t task) {
  const int T_ = p.frames, D = p.head_dim, Dp = buf.tiles.Dp;
  const auto [b, s, h] = TokenHead(p, task);
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), out(p.out_t);
  prefetch_frames(p, task + PREFETCH_TASKS, q, k, v);
  float *q_tile = buf.tiles[0], *k_tile = buf.tiles[1], *v_tile = buf.tiles[2], *o_tile = buf.tiles[3];
  load_rows(q_tile, Dp, q.at(b, 0, s, h), q.st, T_, D);
  load_rows(k_tile, Dp, k.at(b, 0, s, h), k.st, T_, D);
  load_rows(v_tile, Dp, v.at(b, 0, s, h), v.st, T_, D);
  temporal_forward_tile(p, buf.bands, q_tile, k_tile, v_tile, o_tile, Dp, buf.scores.get(), buf.tiles.Tp,
                        buf.lse.get());
  float* lse_t = p.lse_t + stat_index(p, b, 0, h, s);
  for (int t = 0; t < T_; ++t) lse_t[static_cast<int64_t>(t) * p.heads * p.tokens] = buf.lse[t];
  if (sums_branches(p))  // read back by the spatial pass: into the caches
    store_rows(o_t.at(b, 0, s, h), o_t.st, o_tile, Dp, T_, D);
  else
    stream_rows(out.at(b, 0, s, h), out.st, o_tile, Dp, T_, D);
}

// Float32 working copies of the spatial forward, one thread's (Dp, Sp: D, S padded to 16).
struct SpatialForwardBuffers {
  int Dp, Sp;
  FloatArray keys, keys_t, values, q, scores, acc, lse;
  int64_t gathered = -1;  // the frame-head whose keys are in keys_t and whose values value_rows points at
  const float* value_rows = nullptr;  // its values in float32: in place (see float_rows) or in `values`
  int64_t ld_v = 0;
  explicit SpatialForwardBuffers(const AttentionParams& p)
      : Dp(padded(p.head_dim)), Sp(padded(p.tokens)), keys(floats(static_cast<int64_t>(p.tokens) * Dp)),
        keys_t(floats(static_cast<int64_t>(Dp) * Sp)),
        values(floats(static_cast<int64_t>(p.tokens) * Dp)), q(floats(static_cast<int64_t>(BLOCK_Q) * Dp)),
        scores(floats(static_cast<int64_t>(BLOCK_Q) * Sp)), acc(floats(static_cast<int64_t>(BLOCK_Q) * Dp)),
        lse(floats(BLOCK_Q)) {}
};

// Spatial rows [s0, s0 + rows) of frame-head (b, t, h): out = o_s (+ o_t, read from `o_t`, when the branches
// are summed); lse_s written.
template <typename T>
void spatial_forward_task(const AttentionParams& p, SpatialForwardBuffers& buf, const Rows<float>& o_t,
                          int64_t frame_head, int s0, int rows) {
  const int S = p.tokens, D = p.head_dim, Dp = buf.Dp, Sp = buf.Sp;
  const int h = static_cast<int>(frame_head % p.heads);
  const int t = static_cast<int>(frame_head / p.heads % p.frames);
  const int b = static_cast<int>(frame_head / p.heads / p.frames);
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), out(p.out);
  if (buf.gathered != frame_head) {
    int64_t ld_k;
    const float* keys = float_rows(k.at(b, t, 0, h), k.ss, S, D, buf.keys.get(), Dp, ld_k);
    transpose(buf.keys_t.get(), Sp, keys, ld_k, S, D);
    buf.value_rows = float_rows(v.at(b, t, 0, h), v.ss, S, D, buf.values.get(), Dp, buf.ld_v);
    buf.gathered = frame_head;
  }
  int64_t ld_q;
  const float* queries = float_rows(q.at(b, t, s0, h), q.ss, rows, D, buf.q.get(), Dp, ld_q);
  matmul(rows, S, D, queries, ld_q, buf.keys_t.get(), Sp, buf.scores.get(), Sp);  // Q K^T
  softmax_rows(buf.scores.get(), Sp, rows, S, p.scale, buf.lse.get());
  std::copy(buf.lse.get(), buf.lse.get() + rows, p.lse_s + stat_index(p, b, t, h, s0));
  const bool add = sums_branches(p);
  if constexpr (std::is_same_v<T, float>) {  // straight into out, where o_t waits when added (see forward)
    matmul(rows, D, S, buf.scores.get(), Sp, buf.value_rows, buf.ld_v, out.at(b, t, s0, h), out.ss, add);
  } else {
    float* acc = buf.acc.get();
    if (add) load_rows(acc, Dp, o_t.at(b, t, s0, h), o_t.ss, rows, D);
    matmul(rows, D, S, buf.scores.get(), Sp, buf.value_rows, buf.ld_v, acc, Dp, add);  // P V (+ o_t)
    store_rows(out.at(b, t, s0, h), out.ss, acc, Dp, rows, D);
  }
}

// The temporal pass first (o_t kept in float32 when the spatial branch follows), then the spatial pass, one task
// per (frame-head, block of BLOCK_Q tokens).
template <typename T>
void forward(const AttentionParams& p) {
  const int B = p.batch, T_ = p.frames, S = p.tokens, H = p.heads, D = p.head_dim;
  // o_t waits in float32 for the spatial pass: in out itself when out is float32, else in a contiguous copy.
  const bool in_out = std::is_same_v<T, float>;
  FloatArray storage = floats(sums_branches(p) && !in_out ? static_cast<int64_t>(B) * T_ * S * H * D : 0);
  TensorRef o_t_ref = p.out;
  if (!in_out) {
    o_t_ref.data = storage.get();
    o_t_ref.stride_h = D;
    o_t_ref.stride_s = static_cast<int64_t>(H) * D;
    o_t_ref.stride_t = o_t_ref.stride_s * S;
    o_t_ref.stride_b = o_t_ref.stride_t * T_;
  }
  const Rows<float> o_t(o_t_ref);
  if (p.temporal) {
    const int64_t flops = 4 * static_cast<int64_t>(T_) * T_ * D;
    run_tasks<TemporalForwardBuffers>(p, static_cast<int64_t>(B) * S * H, flops, 1,
                                      [&](TemporalForwardBuffers& buf, int64_t task) {
                                        temporal_forward_task<T>(p, buf, o_t, task);
                                      });
  }
  if (p.spatial) {
    const int blocks = (S + BLOCK_Q - 1) / BLOCK_Q;
    const int64_t flops = 4 * static_cast<int64_t>(std::min(S, BLOCK_Q)) * S * D;
    // Runs of whole frame-heads: a thread gathers a frame-head's keys and values once.
    run_tasks<SpatialForwardBuffers>(p, static_cast<int64_t>(B) * T_ * H * blocks, flops, blocks,
                                     [&](SpatialForwardBuffers& buf, int64_t task) {
                                       const int s0 = static_cast<int>(task % blocks) * BLOCK_Q;
                                       spatial_forward_task<T>(p, buf, o_t, task / blocks, s0,
                                                               std::min(BLOCK_Q, S - s0));
                                     });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// The temporal backward of one token-head from its tiles q, k, v, dout (row stride ld), in the transposed
// layout of temporal_forward_tile: P^T[u, t] = exp(scale q[t] . k[u] - lse[t]) over the attended frames (exactly
// 1 for a single frame: the scores are computed as in the forward, so the score minus its lse is exactly 0),
// dP^T[u, t] = dout[t] . v[u], delta[t] = sum_u P dP / sum_u P, dS'^T[u, t] = scale P (dP - delta[t]) (in prob
// and dscore, row stride ld_s). Then dq[t] = sum_u dS'[t, u] k[u] over t's attended frames, and for
// key frame u, over the query frames it is live for (the grad window): dk[u] = sum_t dS'[t, u] q[t],
// dv[u] = sum_t P[t, u] dout[t], the rows of dS'^T and P^T read contiguously.
PYCHOP_CPU_CLONES void temporal_backward_tile(const AttentionParams& p, const TemporalBands& bands,
                                              const float* q, const float* k, const float* v, const float* dout,
                                              float* dq, float* dk, float* dv, int64_t ld, float* prob,
                                              float* dscore, int64_t ld_s, const float* lse) {
  const int T_ = p.frames, Dv = ceil8(p.head_dim);
  temporal_scores(bands, q, k, ld, Dv, p.scale, prob, ld_s);
  temporal_scores(bands, dout, v, ld, Dv, 1.f, dscore, ld_s);
  for (int t0 = 0; t0 < bands.queries; t0 += 8) {
    float dsum[8] = {}, psum[8] = {};
    for (int u = 0; u < T_; ++u) {
      float *pr = prob + u * ld_s + t0, *ds = dscore + u * ld_s + t0;
      const float* bias = bands.bias.get() + u * bands.queries + t0;
      for (int j = 0; j < 8; ++j) {
        pr[j] = exp_nonpositive(pr[j] + bias[j] - lse[t0 + j]);
        dsum[j] += pr[j] * ds[j];
        psum[j] += pr[j];
      }
    }
    for (int j = 0; j < 8; ++j) dsum[j] = normalized_delta(dsum[j], psum[j]);
    for (int u = 0; u < T_; ++u) {
      const float* pr = prob + u * ld_s + t0;
      float* ds = dscore + u * ld_s + t0;
      for (int j = 0; j < 8; ++j) ds[j] = p.scale * pr[j] * (ds[j] - dsum[j]);
    }
  }
  for (int t = 0; t < T_; ++t) {
    const int first = bands.first[t];
    combine_rows(dq + t * ld, dscore + first * ld_s + t, ld_s, k + first * ld, ld, bands.last[t] - first + 1, Dv);
  }
  for (int u = 0; u < T_; ++u) {
    const int lo = bands.query_lo[u], n = bands.query_hi[u] - lo + 1;
    combine_rows(dk + u * ld, dscore + u * ld_s + lo, 1, q + lo * ld, ld, n, Dv);
    combine_rows(dv + u * ld, prob + u * ld_s + lo, 1, dout + lo * ld, ld, n, Dv);
  }
}

// One thread's working memory for the temporal backward: the bands, tiles q, k, v, dout, dq, dk, dv, the
// transposed probabilities and score gradients (T x Tp) and the logsumexps.
struct TemporalBackwardBuffers {
  TemporalBands bands;
  TemporalTiles tiles;
  FloatArray prob, dscore, lse;
  explicit TemporalBackwardBuffers(const AttentionParams& p)
      : bands(p), tiles(p, 7), prob(floats(static_cast<int64_t>(p.frames) * tiles.Tp)),
        dscore(floats(static_cast<int64_t>(p.frames) * tiles.Tp)), lse(floats(tiles.Tp)) {
    std::fill(lse.get(), lse.get() + tiles.Tp, 0.f);
  }
};

// One token-head (b, s, h): the temporal backward over its frames. Writes dq_t, dk_t, dv_t.
template <typename T>
void temporal_backward_task(const AttentionParams& p, TemporalBackwardBuffers& buf, int64_t task) {
  const int T_ = p.frames, D = p.head_dim, Dp = buf.tiles.Dp;
  const auto [b, s, h] = TokenHead(p, task);
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), dout(p.dout_t), dq(p.dq_t), dk(p.dk_t), dv(p.dv_t);
  prefetch_frames(p, task + PREFETCH_TASKS, q, k, v, dout);
  float* tile[7];
  for (int i = 0; i < 7; ++i) tile[i] = buf.tiles[i];
  load_rows(tile[0], Dp, q.at(b, 0, s, h), q.st, T_, D);
  load_rows(tile[1], Dp, k.at(b, 0, s, h), k.st, T_, D);
  load_rows(tile[2], Dp, v.at(b, 0, s, h), v.st, T_, D);
  load_rows(tile[3], Dp, dout.at(b, 0, s, h), dout.st, T_, D);
  const int64_t stat = stat_index(p, b, 0, h, s), stat_stride = static_cast<int64_t>(p.heads) * p.tokens;
  for (int t = 0; t < T_; ++t) buf.lse[t] = p.lse_t[stat + t * stat_stride];
  temporal_backward_tile(p, buf.bands, tile[0], tile[1], tile[2], tile[3], tile[4], tile[5], tile[6], Dp,
                         buf.prob.get(), buf.dscore.get(), buf.tiles.Tp, buf.lse.get());
  stream_rows(dq.at(b, 0, s, h), dq.st, tile[4], Dp, T_, D);
  stream_rows(dk.at(b, 0, s, h), dk.st, tile[5], Dp, T_, D);
  stream_rows(dv.at(b, 0, s, h), dv.st, tile[6], Dp, T_, D);
}

// Float32 working copies of the spatial backward, one thread's (Dp, Sp: D, S padded to 16). The names ending
// in _t hold transposes: keys_t, values_t, dk_t, dv_t are D x S, q_t and dout_t D x BLOCK_Q_BWD. keys, values,
// q, dout are float32 copies of rows the gemms cannot read in place (see float_rows); dq and rows stage
// gradients for a non-float32 output.
struct SpatialBackwardBuffers {
  int Dp, Sp;
  FloatArray keys, values, rows, keys_t, values_t, dk_t, dv_t, q, q_t, dout, dout_t, dq, prob, dprob, lse;
  explicit SpatialBackwardBuffers(const AttentionParams& p)
      : Dp(padded(p.head_dim)), Sp(padded(p.tokens)), keys(floats(static_cast<int64_t>(p.tokens) * Dp)),
        values(floats(static_cast<int64_t>(p.tokens) * Dp)), rows(floats(static_cast<int64_t>(p.tokens) * Dp)),
        keys_t(floats(static_cast<int64_t>(Dp) * Sp)), values_t(floats(static_cast<int64_t>(Dp) * Sp)),
        dk_t(floats(static_cast<int64_t>(Dp) * Sp)), dv_t(floats(static_cast<int64_t>(Dp) * Sp)),
        q(floats(static_cast<int64_t>(BLOCK_Q_BWD) * Dp)), q_t(floats(static_cast<int64_t>(Dp) * BLOCK_Q_BWD)),
        dout(floats(static_cast<int64_t>(BLOCK_Q_BWD) * Dp)),
        dout_t(floats(static_cast<int64_t>(Dp) * BLOCK_Q_BWD)), dq(floats(static_cast<int64_t>(BLOCK_Q_BWD) * Dp)),
        prob(floats(static_cast<int64_t>(BLOCK_Q_BWD) * Sp)), dprob(floats(static_cast<int64_t>(BLOCK_Q_BWD) * Sp)),
        lse(floats(BLOCK_Q_BWD)) {}
};

// One frame-head (b, t, h): dq_s, dk_s, dv_s, query block by query block. The scale is applied to the scores
// (P = exp(scale Q K^T - lse)) and to dS (dS' = scale dS), so that dQ = dS' K and dK^T = Q^T dS' need no
// scaled copy of Q; float32 inputs are read in place, float32 gradients written in place.
template <typename T>
void spatial_backward_task(const AttentionParams& p, SpatialBackwardBuffers& buf, int64_t task) {
  constexpr bool in_place = std::is_same_v<T, float>;
  const int S = p.tokens, D = p.head_dim, Dp = buf.Dp, Sp = buf.Sp;
  const int h = static_cast<int>(task % p.heads);
  const int t = static_cast<int>(task / p.heads % p.frames);
  const int b = static_cast<int>(task / p.heads / p.frames);
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), dout(p.dout), dq(p.dq_s), dk(p.dk_s), dv(p.dv_s);
  float *prob = buf.prob.get(), *dprob = buf.dprob.get(), *lse = buf.lse.get();
  int64_t ld_k, ld_v;
  const float* keys = float_rows(k.at(b, t, 0, h), k.ss, S, D, buf.keys.get(), Dp, ld_k);
  const float* values = float_rows(v.at(b, t, 0, h), v.ss, S, D, buf.values.get(), Dp, ld_v);
  transpose(buf.keys_t.get(), Sp, keys, ld_k, S, D);
  transpose(buf.values_t.get(), Sp, values, ld_v, S, D);
  for (int s0 = 0; s0 < S; s0 += BLOCK_Q_BWD) {
    const int rows = std::min(BLOCK_Q_BWD, S - s0);
    int64_t ld_q, ld_o;
    const float* qs = float_rows(q.at(b, t, s0, h), q.ss, rows, D, buf.q.get(), Dp, ld_q);
    const float* douts = float_rows(dout.at(b, t, s0, h), dout.ss, rows, D, buf.dout.get(), Dp, ld_o);
    transpose(buf.q_t.get(), BLOCK_Q_BWD, qs, ld_q, rows, D);
    transpose(buf.dout_t.get(), BLOCK_Q_BWD, douts, ld_o, rows, D);
    for (int i = 0; i < rows; ++i) lse[i] = p.lse_s[stat_index(p, b, t, h, s0 + i)];
    matmul(rows, S, D, qs, ld_q, buf.keys_t.get(), Sp, prob, Sp);         // Q K^T
    matmul(rows, S, D, douts, ld_o, buf.values_t.get(), Sp, dprob, Sp);  // dP = dO V^T
    softmax_grad_rows(prob, dprob, Sp, rows, S, p.scale, lse);           // P, dS' = scale dS
    if constexpr (in_place) {
      matmul(rows, D, S, dprob, Sp, keys, ld_k, dq.at(b, t, s0, h), dq.ss);  // dQ = dS' K
    } else {
      matmul(rows, D, S, dprob, Sp, keys, ld_k, buf.dq.get(), Dp);
      store_rows(dq.at(b, t, s0, h), dq.ss, buf.dq.get(), Dp, rows, D);
    }
    matmul(D, S, rows, buf.dout_t.get(), BLOCK_Q_BWD, prob, Sp, buf.dv_t.get(), Sp, s0 > 0);  // dV^T += dO^T P
    matmul(D, S, rows, buf.q_t.get(), BLOCK_Q_BWD, dprob, Sp, buf.dk_t.get(), Sp, s0 > 0);    // dK^T += Q^T dS'
  }
  if constexpr (in_place) {
    transpose(dk.at(b, t, 0, h), dk.ss, buf.dk_t.get(), Sp, D, S);
    transpose(dv.at(b, t, 0, h), dv.ss, buf.dv_t.get(), Sp, D, S);
  } else {
    transpose(buf.rows.get(), Dp, buf.dk_t.get(), Sp, D, S);
    store_rows(dk.at(b, t, 0, h), dk.ss, buf.rows.get(), Dp, S, D);
    transpose(buf.rows.get(), Dp, buf.dv_t.get(), Sp, D, S);
    store_rows(dv.at(b, t, 0, h), dv.ss, buf.rows.get(), Dp, S, D);
  }
}

template <typename T>
void backward(const AttentionParams& p) {
  const int64_t T_ = p.frames, S = p.tokens, D = p.head_dim;
  if (p.temporal) {
    const int64_t tasks = static_cast<int64_t>(p.batch) * S * p.heads;
    run_tasks<TemporalBackwardBuffers>(p, tasks, 10 * T_ * T_ * D, 1, [&](TemporalBackwardBuffers& buf, int64_t task) {
      temporal_backward_task<T>(p, buf, task);
    });
  }
  if (p.spatial) {
    const int64_t tasks = static_cast<int64_t>(p.batch) * T_ * p.heads;
    run_tasks<SpatialBackwardBuffers>(p, tasks, 10 * S * S * D, 1, [&](SpatialBackwardBuffers& buf, int64_t task) {
      spatial_backward_task<T>(p, buf, task);
    });
  }
}

}  // namespace

#define PYCHOP_DISPATCH_DTYPE(params, FN)                       \
  switch ((params).dtype) {                                     \
    case ScalarKind::Float32: FN<float>(params); break;         \
    case ScalarKind::Float16: FN<c10::Half>(params); break;     \
    case ScalarKind::BFloat16: FN<c10::BFloat16>(params); break; \
  }

void parallel_st_attention_fwd_cpu(const AttentionParams& params) { PYCHOP_DISPATCH_DTYPE(params, forward) }

void parallel_st_attention_bwd_cpu(const AttentionParams& params) { PYCHOP_DISPATCH_DTYPE(params, backward) }

}  // namespace pychop

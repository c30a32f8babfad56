// CPU kernels of the fused parallel spatial-temporal attention.
//
// Forward: one task per (batch, frame, head, block of BLOCK_Q tokens) computes both branches for its rows and
// writes out = o_s + o_t once, rounded from float32 (stacked: o_s to out, o_t to out_t). Backward: the
// temporal pass (one task per token-head, all frames) writes dq_t, dk_t, dv_t and delta_t = rowsum(dout_t *
// o_t); the spatial pass (one task per frame-head) uses delta_s = rowsum(dout * o_s), which is rowsum(dout *
// out) - delta_t when out holds the sum, and writes dq_s, dk_s, dv_s.
//
// All arithmetic is float32, on zero-padded float32 copies; queries are scaled as they are loaded. Matrix
// products accumulate tiles of rows in 16-lane vector registers (accumulate_rows). The two leaf kernels that
// carry the work, accumulate_rows and exp_shifted, are compiled for AVX-512, AVX2 and baseline x86-64, and the
// best is picked at load time; the rest is compiled once.
#include "attention/kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCHOP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYCHOP_CPU_CLONES
#endif
#define PYCHOP_INLINE inline __attribute__((always_inline))

namespace pychop {
namespace {

constexpr int BLOCK_Q = 64;  // query rows per spatial task

template <typename T>
struct Rows {  // element (b, t, s, h, 0) of a TensorRef, typed
  T* data;
  int64_t sb, st, ss, sh;
  explicit Rows(const TensorRef& r)
      : data(static_cast<T*>(r.data)), sb(r.stride_b), st(r.stride_t), ss(r.stride_s), sh(r.stride_h) {}
  PYCHOP_INLINE T* at(int b, int t, int s, int h) const { return data + b * sb + t * st + s * ss + h * sh; }
};

template <typename T>
PYCHOP_INLINE void load_row(float* __restrict__ dst, const T* __restrict__ src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
PYCHOP_INLINE void load_row(float* __restrict__ dst, const T* __restrict__ src, int n, float factor) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * factor;
}

// A float32 view of a row: the row itself for float tensors, else a converted copy in `scratch`.
template <typename T>
PYCHOP_INLINE const float* float_row(const T* src, float* scratch, int n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_row(scratch, src, n);
    return scratch;
  }
}

template <typename T>
PYCHOP_INLINE void store_row(T* __restrict__ dst, const float* __restrict__ src, int n, float factor = 1.f) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * factor);
}

PYCHOP_INLINE void axpy(float* __restrict__ y, float a, const float* __restrict__ x, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// A fixed summation order (8 lanes, then the tail), whatever the alignment: the backward recomputes the
// forward's scores bit for bit, so a softmax over one key gives a probability of exactly 1.
PYCHOP_INLINE float dot(const float* __restrict__ x, const float* __restrict__ y, int n) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l] * y[i + l];
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// exp(x) for x <= 0 (scores minus their max or logsumexp), in plain arithmetic so that loops over it vectorize:
// x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 split in two for precision), exp(r) by a degree-7
// polynomial (Cephes' coefficients, about 1 ulp), 2^n assembled in the exponent bits. exp(0) is 1.
PYCHOP_INLINE float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;  // exp(-87) ~ 1.6e-38: still a normal float
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
  return poly * two_n;
}

// x[i] = exp(x[i] - shift) for shift >= max(x); returns the sum.
PYCHOP_CPU_CLONES float exp_shifted(float* __restrict__ x, int n, float shift) {
  for (int i = 0; i < n; ++i) x[i] = exp_nonpositive(x[i] - shift);
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l];
  float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) sum += x[i];
  return sum;
}

PYCHOP_INLINE float max_of(const float* __restrict__ x, int n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

PYCHOP_INLINE int64_t stat_index(const AttentionParams& p, int b, int t, int h, int s) {
  return ((static_cast<int64_t>(b) * p.frames + t) * p.heads + h) * p.tokens + s;
}

// Float32 vectors of 16 lanes (GCC vector extensions: one AVX-512 register, two AVX2 or four SSE ones).
typedef float vec16 __attribute__((vector_size(64)));
constexpr int LANES = 16;

PYCHOP_INLINE int round_up(int n) { return (n + LANES - 1) / LANES * LANES; }

PYCHOP_INLINE vec16 load16(const float* src) {
  vec16 v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

PYCHOP_INLINE void store16(float* dst, vec16 v) { std::memcpy(dst, &v, sizeof(v)); }

// y[0:16 V) += sum_r coef[r * coef_stride] x[r * ldx + 0:16 V), with V * P independent register
// accumulators (rows taken P at a time) so that the FMA latency is hidden.
template <int V, int P>
PYCHOP_INLINE void accumulate_chunk(float* __restrict__ y, const float* __restrict__ coef, int64_t coef_stride,
                                    const float* __restrict__ x, int64_t ldx, int rows) {
  vec16 acc[P][V];
  for (int v = 0; v < V; ++v) {
    acc[0][v] = load16(y + v * LANES);
    for (int phase = 1; phase < P; ++phase) acc[phase][v] = vec16{};
  }
  int r = 0;
  for (; r + P <= rows; r += P)
    for (int phase = 0; phase < P; ++phase) {
      const float w = coef[(r + phase) * coef_stride];
      const float* xr = x + (r + phase) * ldx;
      for (int v = 0; v < V; ++v) acc[phase][v] += w * load16(xr + v * LANES);
    }
  for (; r < rows; ++r) {
    const float w = coef[r * coef_stride];
    for (int v = 0; v < V; ++v) acc[0][v] += w * load16(x + r * ldx + v * LANES);
  }
  for (int v = 0; v < V; ++v) {
    for (int phase = 1; phase < P; ++phase) acc[0][v] += acc[phase][v];
    store16(y + v * LANES, acc[0][v]);
  }
}

// Y[i, 0:16 V) += sum_r coef[i * coef_row + r * coef_step] x[r * ldx + 0:16 V) for R output rows i at
// once: each load of x feeds R FMAs, and the R * V accumulators stay in registers.
template <int R, int V>
PYCHOP_INLINE void accumulate_tile(float* __restrict__ y, int64_t ldy, const float* __restrict__ coef,
                                   int64_t coef_row, int64_t coef_step, const float* __restrict__ x, int64_t ldx,
                                   int rows) {
  vec16 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = load16(y + i * ldy + v * LANES);
  for (int r = 0; r < rows; ++r) {
    vec16 xr[V];
    for (int v = 0; v < V; ++v) xr[v] = load16(x + r * ldx + v * LANES);
    for (int i = 0; i < R; ++i) {
      const float w = coef[i * coef_row + r * coef_step];
      for (int v = 0; v < V; ++v) acc[i][v] += w * xr[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) store16(y + i * ldy + v * LANES, acc[i][v]);
}

// Y[i, 0:n) += sum_r coef[i * coef_row + r * coef_step] * x[r * ldx + 0:n) for `count` rows i of Y (row
// stride ldy), n a multiple of 16: the matrix product Y += C X with C read through (coef_row, coef_step).
// Every matrix product of the kernels is this, on zero-padded float32 copies: scores (C: query rows, X: keys
// transposed), P V and dS K (C: rows of P or dS), P^T dO and dS^T Q (C: P or dS read by columns).
PYCHOP_CPU_CLONES void accumulate_rows(float* __restrict__ y, int64_t ldy, int count, int n,
                                   const float* __restrict__ coef, int64_t coef_row, int64_t coef_step,
                                   const float* __restrict__ x, int64_t ldx, int rows) {
  int i = 0;
  for (; i + 4 <= count; i += 4) {
    float* yi = y + i * ldy;
    const float* ci = coef + i * coef_row;
    int c = 0;
    for (; c + 4 * LANES <= n; c += 4 * LANES) accumulate_tile<4, 4>(yi + c, ldy, ci, coef_row, coef_step, x + c, ldx, rows);
    if (c + 2 * LANES <= n) {
      accumulate_tile<4, 2>(yi + c, ldy, ci, coef_row, coef_step, x + c, ldx, rows);
      c += 2 * LANES;
    }
    if (c < n) accumulate_tile<4, 1>(yi + c, ldy, ci, coef_row, coef_step, x + c, ldx, rows);
  }
  for (; i < count; ++i) {  // the last rows one at a time, rows of x taken P at a time
    float* yi = y + i * ldy;
    const float* ci = coef + i * coef_row;
    int c = 0;
    for (; c + 4 * LANES <= n; c += 4 * LANES) accumulate_chunk<4, 2>(yi + c, ci, coef_step, x + c, ldx, rows);
    if (c + 2 * LANES <= n) {
      accumulate_chunk<2, 4>(yi + c, ci, coef_step, x + c, ldx, rows);
      c += 2 * LANES;
    }
    if (c < n) accumulate_chunk<1, 8>(yi + c, ci, coef_step, x + c, ldx, rows);
  }
}

// Gathers the S x D matrix of (b, t, h) into `rows` (S x ld, if given) and/or its transpose `cols`
// (D x ld_cols). Padding columns and rows are left as they are (zero in the callers' buffers).
template <typename T>
PYCHOP_INLINE void gather_frame(const Rows<T>& x, int b, int t, int h, int S, int D, float* rows, int ld,
                                float* cols, int ld_cols, float* scratch) {
  for (int s = 0; s < S; ++s) {
    float* row = rows != nullptr ? rows + static_cast<int64_t>(s) * ld : scratch;
    load_row(row, x.at(b, t, s, h), D);
    if (cols != nullptr)
      for (int d = 0; d < D; ++d) cols[static_cast<int64_t>(d) * ld_cols + s] = row[d];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// Float32 working copies, zero-initialised once per thread; Dp and Sp are D and S padded to 16.
struct ForwardBuffers {
  int Dp, Sp;
  std::vector<float> keys_t, values, q, scores, acc, k_frames, v_frames, tscores;
  explicit ForwardBuffers(const AttentionParams& p)
      : Dp(round_up(p.head_dim)), Sp(round_up(p.tokens)),
        keys_t(p.spatial ? static_cast<size_t>(Dp) * Sp : 0),
        values(p.spatial ? static_cast<size_t>(Sp) * Dp : 0),
        q(static_cast<size_t>(BLOCK_Q) * Dp),
        scores(p.spatial ? static_cast<size_t>(BLOCK_Q) * Sp : 0),
        acc(static_cast<size_t>(BLOCK_Q) * Dp),
        k_frames(static_cast<size_t>(p.frames) * Dp),
        v_frames(static_cast<size_t>(p.frames) * Dp),
        tscores(p.frames) {}
};

// Spatial rows [s0, s0 + rows) of frame (b, t), head h: acc = o_s, lse_s written.
template <typename T>
PYCHOP_INLINE void spatial_forward_rows(const AttentionParams& p, ForwardBuffers& buf, int b, int t, int h,
                                        int s0, int rows) {
  const int S = p.tokens, D = p.head_dim, Dp = buf.Dp, Sp = buf.Sp;
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s);
  gather_frame(k, b, t, h, S, D, nullptr, 0, buf.keys_t.data(), Sp, buf.acc.data());
  gather_frame(v, b, t, h, S, D, buf.values.data(), Dp, nullptr, 0, nullptr);
  float *qb = buf.q.data(), *scores = buf.scores.data(), *acc = buf.acc.data();
  for (int i = 0; i < rows; ++i) load_row(qb + i * Dp, q.at(b, t, s0 + i, h), D, p.scale);
  std::fill(scores, scores + static_cast<int64_t>(rows) * Sp, 0.f);
  accumulate_rows(scores, Sp, rows, Sp, qb, Dp, 1, buf.keys_t.data(), Sp, D);  // scale Q K^T
  for (int i = 0; i < rows; ++i) {
    float* score = scores + static_cast<int64_t>(i) * Sp;
    const float max_score = max_of(score, S);
    const float sum = exp_shifted(score, S, max_score);
    p.lse_s[stat_index(p, b, t, h, s0 + i)] = max_score + std::log(sum);
    const float inv = 1.f / sum;
    for (int j = 0; j < S; ++j) score[j] *= inv;
  }
  std::fill(acc, acc + static_cast<int64_t>(rows) * Dp, 0.f);
  accumulate_rows(acc, Dp, rows, Dp, scores, Sp, 1, buf.values.data(), Dp, S);  // P V
}

// Temporal attention of token s0 + i at frame t, head h, added into acc row i; lse_t written.
template <typename T>
PYCHOP_INLINE void temporal_forward_rows(const AttentionParams& p, ForwardBuffers& buf, int b, int t, int h,
                                         int s0, int rows, bool add) {
  const int D = p.head_dim, Dp = buf.Dp;
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t);
  int first, last;
  attended_frames(p, t, first, last);
  float* score = buf.tscores.data();
  for (int i = 0; i < rows; ++i) {
    const int s = s0 + i;
    float* qrow = buf.q.data() + i * Dp;
    load_row(qrow, q.at(b, t, s, h), D, p.scale);
    float max_score = -std::numeric_limits<float>::infinity();
    for (int u = first; u <= last; ++u) {
      const float* krow = float_row(k.at(b, u, s, h), buf.k_frames.data() + static_cast<int64_t>(u) * Dp, D);
      score[u] = dot(qrow, krow, D);
      max_score = std::max(max_score, score[u]);
    }
    const float sum = exp_shifted(score + first, last - first + 1, max_score);
    p.lse_t[stat_index(p, b, t, h, s)] = max_score + std::log(sum);
    float* out = buf.acc.data() + i * Dp;
    if (!add) std::fill(out, out + D, 0.f);
    const float inv = 1.f / sum;
    for (int u = first; u <= last; ++u) {
      const float* vrow = float_row(v.at(b, u, s, h), buf.v_frames.data() + static_cast<int64_t>(u) * Dp, D);
      axpy(out, score[u] * inv, vrow, D);
    }
  }
}

template <typename T>
void forward_task(const AttentionParams& p, ForwardBuffers& buf, int64_t task) {
  const int blocks = (p.tokens + BLOCK_Q - 1) / BLOCK_Q;
  const int block = static_cast<int>(task % blocks);
  const int h = static_cast<int>(task / blocks % p.heads);
  const int t = static_cast<int>(task / blocks / p.heads % p.frames);
  const int b = static_cast<int>(task / blocks / p.heads / p.frames);
  const int s0 = block * BLOCK_Q, rows = std::min(BLOCK_Q, p.tokens - s0);
  const auto store = [&](const TensorRef& ref) {
    const Rows<T> out(ref);
    for (int i = 0; i < rows; ++i) store_row(out.at(b, t, s0 + i, h), buf.acc.data() + i * buf.Dp, p.head_dim);
  };
  if (p.spatial) {
    spatial_forward_rows<T>(p, buf, b, t, h, s0, rows);
    if (p.stacked) store(p.out);
  }
  if (p.temporal) temporal_forward_rows<T>(p, buf, b, t, h, s0, rows, /*add=*/p.spatial && !p.stacked);
  store(p.temporal ? p.out_t : p.out);  // out_t is out unless the branches are stacked
}

template <typename T>
void forward(const AttentionParams& p) {
  const int64_t blocks = (p.tokens + BLOCK_Q - 1) / BLOCK_Q;
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.frames * p.heads * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ForwardBuffers buf(p);
    for (int64_t task = begin; task < end; ++task) forward_task<T>(p, buf, task);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// Float32 working copies of the temporal backward, zero-initialised once per thread (Dp, Tp: D, T padded).
struct TemporalBackwardBuffers {
  int Dp, Tp;
  std::vector<float> q, keys, keys_t, values_t, dout, prob, dscore, grad;
  explicit TemporalBackwardBuffers(const AttentionParams& p)
      : Dp(round_up(p.head_dim)), Tp(round_up(p.frames)),
        q(static_cast<size_t>(p.frames) * Dp), keys(static_cast<size_t>(p.frames) * Dp),
        keys_t(static_cast<size_t>(Dp) * Tp), values_t(static_cast<size_t>(Dp) * Tp),
        dout(static_cast<size_t>(p.frames) * Dp), prob(static_cast<size_t>(p.frames) * Tp),
        dscore(static_cast<size_t>(p.frames) * Tp), grad(static_cast<size_t>(p.frames) * Dp) {}
};

// One token-head (b, s, h): the T x T attention over its frames, backward. Writes dq_t, dk_t, dv_t and
// delta_t = rowsum(dout * o_t) = sum_u P[t, u] dP[t, u]. dq uses every attended frame; P and dS are then
// cleared where the grad window makes k_t, v_t constants, for dk = dS^T (scale Q) and dv = P^T dO.
template <typename T>
void temporal_backward_task(const AttentionParams& p, TemporalBackwardBuffers& buf,
                                              int64_t task) {
  const int T_ = p.frames, D = p.head_dim, Dp = buf.Dp, Tp = buf.Tp;
  const int h = static_cast<int>(task % p.heads);
  const int s = static_cast<int>(task / p.heads % p.tokens);
  const int b = static_cast<int>(task / p.heads / p.tokens);
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), dout(p.dout_t), dq(p.dq_t), dk(p.dk_t), dv(p.dv_t);
  float *qs = buf.q.data(), *keys = buf.keys.data(), *dos = buf.dout.data(), *grad = buf.grad.data();
  float *prob = buf.prob.data(), *dscore = buf.dscore.data();
  const int64_t rows_size = static_cast<int64_t>(T_) * Tp, grad_size = static_cast<int64_t>(T_) * Dp;
  for (int u = 0; u < T_; ++u) {
    load_row(qs + u * Dp, q.at(b, u, s, h), D, p.scale);
    load_row(dos + u * Dp, dout.at(b, u, s, h), D);
    float* krow = keys + u * Dp;
    load_row(krow, k.at(b, u, s, h), D);
    const float* vrow = float_row(v.at(b, u, s, h), grad, D);
    for (int d = 0; d < D; ++d) {
      buf.keys_t[d * Tp + u] = krow[d];
      buf.values_t[d * Tp + u] = vrow[d];
    }
  }
  std::fill(prob, prob + rows_size, 0.f);
  std::fill(dscore, dscore + rows_size, 0.f);
  accumulate_rows(prob, Tp, T_, Tp, qs, Dp, 1, buf.keys_t.data(), Tp, D);      // scale Q K^T
  accumulate_rows(dscore, Tp, T_, Tp, dos, Dp, 1, buf.values_t.data(), Tp, D);  // dO V^T
  for (int t = 0; t < T_; ++t) {
    int first, last;
    attended_frames(p, t, first, last);
    float *pr = prob + t * Tp, *ds = dscore + t * Tp;
    if (first == last) {
      pr[first] = 1.f;  // a softmax over one key is exactly 1 (and then dS is exactly 0)
    } else {
      const float lse = p.lse_t[stat_index(p, b, t, h, s)];
      for (int u = first; u <= last; ++u) pr[u] = exp_nonpositive(pr[u] - lse);
    }
    float delta = 0.f;
    for (int u = first; u <= last; ++u) delta += pr[u] * ds[u];
    if (p.spatial) p.delta_t[stat_index(p, b, t, h, s)] = delta;
    for (int u = 0; u < Tp; ++u) {
      const bool attended = u >= first && u <= last;
      ds[u] = attended ? pr[u] * (ds[u] - delta) : 0.f;
      pr[u] = attended ? pr[u] : 0.f;
    }
  }
  std::fill(grad, grad + grad_size, 0.f);
  accumulate_rows(grad, Dp, T_, Dp, dscore, Tp, 1, keys, Dp, T_);  // dS K
  for (int t = 0; t < T_; ++t) {
    store_row(dq.at(b, t, s, h), grad + t * Dp, D, p.scale);
    int first, last;
    attended_frames(p, t, first, last);
    for (int u = first; u < first_live_frame(p, t, first); ++u) prob[t * Tp + u] = dscore[t * Tp + u] = 0.f;
  }
  std::fill(grad, grad + grad_size, 0.f);
  accumulate_rows(grad, Dp, T_, Dp, dscore, 1, Tp, qs, Dp, T_);  // dK = dS^T (scale Q)
  for (int u = 0; u < T_; ++u) store_row(dk.at(b, u, s, h), grad + u * Dp, D);
  std::fill(grad, grad + grad_size, 0.f);
  accumulate_rows(grad, Dp, T_, Dp, prob, 1, Tp, dos, Dp, T_);  // dV = P^T dO
  for (int u = 0; u < T_; ++u) store_row(dv.at(b, u, s, h), grad + u * Dp, D);
}

// Float32 working copies of the spatial backward, zero-initialised once per thread (Dp, Sp: D, S padded).
struct SpatialBackwardBuffers {
  int Dp, Sp;
  std::vector<float> keys, keys_t, values_t, dk, dv, q, dout, dq, out_row, prob, dprob, delta;
  explicit SpatialBackwardBuffers(const AttentionParams& p)
      : Dp(round_up(p.head_dim)), Sp(round_up(p.tokens)),
        keys(static_cast<size_t>(Sp) * Dp), keys_t(static_cast<size_t>(Dp) * Sp),
        values_t(static_cast<size_t>(Dp) * Sp), dk(static_cast<size_t>(Sp) * Dp), dv(static_cast<size_t>(Sp) * Dp),
        q(static_cast<size_t>(BLOCK_Q) * Dp), dout(static_cast<size_t>(BLOCK_Q) * Dp),
        dq(static_cast<size_t>(BLOCK_Q) * Dp), out_row(Dp), prob(static_cast<size_t>(BLOCK_Q) * Sp),
        dprob(static_cast<size_t>(BLOCK_Q) * Sp), delta(BLOCK_Q) {}
};

// One frame-head (b, t, h): dq_s, dk_s, dv_s.
template <typename T>
void spatial_backward_task(const AttentionParams& p, SpatialBackwardBuffers& buf, int64_t task) {
  const int S = p.tokens, D = p.head_dim, Dp = buf.Dp, Sp = buf.Sp;
  const int h = static_cast<int>(task % p.heads);
  const int t = static_cast<int>(task / p.heads % p.frames);
  const int b = static_cast<int>(task / p.heads / p.frames);
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), out(p.out), dout(p.dout), dq(p.dq_s), dk(p.dk_s), dv(p.dv_s);
  float *keys = buf.keys.data(), *dks = buf.dk.data(), *dvs = buf.dv.data();
  float *qb = buf.q.data(), *dob = buf.dout.data(), *dqb = buf.dq.data();
  float *prob = buf.prob.data(), *dprob = buf.dprob.data(), *delta = buf.delta.data();
  gather_frame(k, b, t, h, S, D, keys, Dp, buf.keys_t.data(), Sp, nullptr);
  gather_frame(v, b, t, h, S, D, nullptr, 0, buf.values_t.data(), Sp, buf.out_row.data());
  std::fill(dks, dks + static_cast<int64_t>(S) * Dp, 0.f);
  std::fill(dvs, dvs + static_cast<int64_t>(S) * Dp, 0.f);
  for (int s0 = 0; s0 < S; s0 += BLOCK_Q) {
    const int rows = std::min(BLOCK_Q, S - s0);
    for (int i = 0; i < rows; ++i) {
      float* dorow = dob + i * Dp;
      load_row(qb + i * Dp, q.at(b, t, s0 + i, h), D, p.scale);
      load_row(dorow, dout.at(b, t, s0 + i, h), D);
      delta[i] = dot(dorow, float_row(out.at(b, t, s0 + i, h), buf.out_row.data(), D), D) -
                 (p.temporal && !p.stacked ? p.delta_t[stat_index(p, b, t, h, s0 + i)] : 0.f);
    }
    std::fill(prob, prob + static_cast<int64_t>(rows) * Sp, 0.f);
    std::fill(dprob, dprob + static_cast<int64_t>(rows) * Sp, 0.f);
    accumulate_rows(prob, Sp, rows, Sp, qb, Dp, 1, buf.keys_t.data(), Sp, D);     // scale Q K^T
    accumulate_rows(dprob, Sp, rows, Sp, dob, Dp, 1, buf.values_t.data(), Sp, D);  // dO V^T
    for (int i = 0; i < rows; ++i) {
      float *pr = prob + static_cast<int64_t>(i) * Sp, *dp = dprob + static_cast<int64_t>(i) * Sp;
      exp_shifted(pr, S, p.lse_s[stat_index(p, b, t, h, s0 + i)]);      // P
      for (int j = 0; j < S; ++j) dp[j] = pr[j] * (dp[j] - delta[i]);  // dS: dq = scale dS k, dk = dS^T (scale q)
    }
    std::fill(dqb, dqb + static_cast<int64_t>(rows) * Dp, 0.f);
    accumulate_rows(dqb, Dp, rows, Dp, dprob, Sp, 1, keys, Dp, S);  // dS K
    accumulate_rows(dvs, Dp, S, Dp, prob, 1, Sp, dob, Dp, rows);    // dV += P^T dO
    accumulate_rows(dks, Dp, S, Dp, dprob, 1, Sp, qb, Dp, rows);    // dK += dS^T (scale Q)
    for (int i = 0; i < rows; ++i) store_row(dq.at(b, t, s0 + i, h), dqb + i * Dp, D, p.scale);
  }
  for (int s = 0; s < S; ++s) {
    store_row(dk.at(b, t, s, h), dks + static_cast<int64_t>(s) * Dp, D);
    store_row(dv.at(b, t, s, h), dvs + static_cast<int64_t>(s) * Dp, D);
  }
}

template <typename T>
void backward(const AttentionParams& p) {
  const int S = p.tokens, T_ = p.frames;
  if (p.temporal) {  // first: the spatial pass reads delta_t
    const int64_t tasks = static_cast<int64_t>(p.batch) * S * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      TemporalBackwardBuffers buf(p);
      for (int64_t task = begin; task < end; ++task) temporal_backward_task<T>(p, buf, task);
    });
  }
  if (p.spatial) {
    const int64_t tasks = static_cast<int64_t>(p.batch) * T_ * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      SpatialBackwardBuffers buf(p);
      for (int64_t task = begin; task < end; ++task) spatial_backward_task<T>(p, buf, task);
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

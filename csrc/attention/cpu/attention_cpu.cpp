// CPU kernels of the fused parallel spatial-temporal attention.
//
// Forward: one task per (batch, frame, head, block of BLOCK_Q tokens) computes both branches for its rows and
// writes out = o_s + o_t once, rounded from float32. Backward: the temporal pass (one task per token-head,
// all frames) writes dq_t, dk_t, dv_t and delta_t = rowsum(dout * o_t); the spatial pass (one task per
// frame-head) uses delta_s = rowsum(dout * out) - delta_t and writes dq_s, dk_s, dv_s.
//
// All arithmetic is float32; queries are scaled as they are loaded. Matrix products are written as axpy loops over a contiguous float32 copy (keys
// transposed where a row of scores is built), so the inner loops are unit-stride and vectorize; the entry
// points are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include "attention/kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

PYCHOP_INLINE int64_t stat_index(const AttentionParams& p, int b, int t, int h, int s) {
  return ((static_cast<int64_t>(b) * p.frames + t) * p.heads + h) * p.tokens + s;
}

// Gathers the S x D matrix of (b, t, h) into `rows` (S x D) and, if asked, its transpose `cols` (D x S).
template <typename T>
PYCHOP_INLINE void gather_frame(const Rows<T>& x, int b, int t, int h, int S, int D, float* rows, float* cols) {
  for (int s = 0; s < S; ++s) {
    const T* src = x.at(b, t, s, h);
    float* row = rows + static_cast<int64_t>(s) * D;
    load_row(row, src, D);
    if (cols != nullptr)
      for (int d = 0; d < D; ++d) cols[static_cast<int64_t>(d) * S + s] = row[d];
  }
}

// scores[i, :] = q[i, :] . keys^T for `rows` query rows, keys given transposed (D x S).
PYCHOP_INLINE void row_scores(float* __restrict__ scores, const float* __restrict__ q,
                              const float* __restrict__ keys_t, int rows, int S, int D) {
  for (int i = 0; i < rows; ++i) {
    float* score = scores + static_cast<int64_t>(i) * S;
    std::fill(score, score + S, 0.f);
    for (int d = 0; d < D; ++d) axpy(score, q[i * D + d], keys_t + static_cast<int64_t>(d) * S, S);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct ForwardBuffers {
  std::vector<float> keys_t, values, q, scores, acc, k_frames, v_frames, tscores;
  ForwardBuffers(const AttentionParams& p)
      : keys_t(p.spatial ? static_cast<size_t>(p.tokens) * p.head_dim : 0),
        values(p.spatial ? static_cast<size_t>(p.tokens) * p.head_dim : 0),
        q(static_cast<size_t>(BLOCK_Q) * p.head_dim),
        scores(p.spatial ? static_cast<size_t>(BLOCK_Q) * p.tokens : 0),
        acc(static_cast<size_t>(BLOCK_Q) * p.head_dim),
        k_frames(static_cast<size_t>(p.frames) * p.head_dim),
        v_frames(static_cast<size_t>(p.frames) * p.head_dim),
        tscores(p.frames) {}
};

// Spatial rows [s0, s0 + rows) of frame (b, t), head h: acc = o_s, lse_s written.
template <typename T>
PYCHOP_INLINE void spatial_forward_rows(const AttentionParams& p, ForwardBuffers<T>& buf, int b, int t, int h,
                                        int s0, int rows) {
  const int S = p.tokens, D = p.head_dim;
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s);
  gather_frame(k, b, t, h, S, D, buf.values.data(), buf.keys_t.data());  // keys kept transposed only
  gather_frame(v, b, t, h, S, D, buf.values.data(), nullptr);
  for (int i = 0; i < rows; ++i) load_row(buf.q.data() + i * D, q.at(b, t, s0 + i, h), D, p.scale);
  row_scores(buf.scores.data(), buf.q.data(), buf.keys_t.data(), rows, S, D);
  for (int i = 0; i < rows; ++i) {
    float* score = buf.scores.data() + static_cast<int64_t>(i) * S;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < S; ++j) max_score = std::max(max_score, score[j]);
    float sum = 0.f;
    for (int j = 0; j < S; ++j) {
      score[j] = std::exp(score[j] - max_score);
      sum += score[j];
    }
    p.lse_s[stat_index(p, b, t, h, s0 + i)] = max_score + std::log(sum);
    float* out = buf.acc.data() + i * D;
    std::fill(out, out + D, 0.f);
    const float inv = 1.f / sum;
    for (int j = 0; j < S; ++j) axpy(out, score[j] * inv, buf.values.data() + static_cast<int64_t>(j) * D, D);
  }
}

// Temporal attention of token s0 + i at frame t, head h, added into acc row i; lse_t written.
template <typename T>
PYCHOP_INLINE void temporal_forward_rows(const AttentionParams& p, ForwardBuffers<T>& buf, int b, int t, int h,
                                         int s0, int rows, bool add) {
  const int D = p.head_dim;
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t);
  int first, last;
  attended_frames(p, t, first, last);
  float* score = buf.tscores.data();
  for (int i = 0; i < rows; ++i) {
    const int s = s0 + i;
    float* qrow = buf.q.data() + i * D;
    load_row(qrow, q.at(b, t, s, h), D, p.scale);
    float max_score = -std::numeric_limits<float>::infinity();
    for (int u = first; u <= last; ++u) {
      float* krow = buf.k_frames.data() + static_cast<int64_t>(u) * D;
      load_row(krow, k.at(b, u, s, h), D);
      score[u] = dot(qrow, krow, D);
      max_score = std::max(max_score, score[u]);
    }
    float sum = 0.f;
    for (int u = first; u <= last; ++u) {
      score[u] = std::exp(score[u] - max_score);
      sum += score[u];
    }
    p.lse_t[stat_index(p, b, t, h, s)] = max_score + std::log(sum);
    float* out = buf.acc.data() + i * D;
    if (!add) std::fill(out, out + D, 0.f);
    const float inv = 1.f / sum;
    for (int u = first; u <= last; ++u) {
      float* vrow = buf.v_frames.data() + static_cast<int64_t>(u) * D;
      load_row(vrow, v.at(b, u, s, h), D);
      axpy(out, score[u] * inv, vrow, D);
    }
  }
}

template <typename T>
PYCHOP_CPU_CLONES void forward_task(const AttentionParams& p, ForwardBuffers<T>& buf, int64_t task) {
  const int blocks = (p.tokens + BLOCK_Q - 1) / BLOCK_Q;
  const int block = static_cast<int>(task % blocks);
  const int h = static_cast<int>(task / blocks % p.heads);
  const int t = static_cast<int>(task / blocks / p.heads % p.frames);
  const int b = static_cast<int>(task / blocks / p.heads / p.frames);
  const int s0 = block * BLOCK_Q, rows = std::min(BLOCK_Q, p.tokens - s0);
  if (p.spatial) spatial_forward_rows(p, buf, b, t, h, s0, rows);
  if (p.temporal) temporal_forward_rows(p, buf, b, t, h, s0, rows, p.spatial);
  const Rows<T> out(p.out);
  for (int i = 0; i < rows; ++i) store_row(out.at(b, t, s0 + i, h), buf.acc.data() + i * p.head_dim, p.head_dim);
}

template <typename T>
void forward(const AttentionParams& p) {
  const int64_t blocks = (p.tokens + BLOCK_Q - 1) / BLOCK_Q;
  const int64_t tasks = static_cast<int64_t>(p.batch) * p.frames * p.heads * blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ForwardBuffers<T> buf(p);
    for (int64_t task = begin; task < end; ++task) forward_task<T>(p, buf, task);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// One token-head (b, s, h) over all frames: dq_t, dk_t, dv_t and delta_t.
template <typename T>
PYCHOP_CPU_CLONES void temporal_backward_task(const AttentionParams& p, std::vector<float>& buf, int64_t task) {
  const int T_ = p.frames, D = p.head_dim;
  const int h = static_cast<int>(task % p.heads);
  const int s = static_cast<int>(task / p.heads % p.tokens);
  const int b = static_cast<int>(task / p.heads / p.tokens);
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), dout(p.dout), dq(p.dq_t), dk(p.dk_t), dv(p.dv_t);
  const int64_t td = static_cast<int64_t>(T_) * D;
  float *qs = buf.data(), *ks = qs + td, *vs = ks + td, *dos = vs + td, *dks = dos + td, *dvs = dks + td;
  float *dqrow = dvs + td, *orow = dqrow + D, *prob = orow + D, *dprob = prob + T_;
  for (int u = 0; u < T_; ++u) {
    load_row(qs + u * D, q.at(b, u, s, h), D, p.scale);
    load_row(ks + u * D, k.at(b, u, s, h), D);
    load_row(vs + u * D, v.at(b, u, s, h), D);
    load_row(dos + u * D, dout.at(b, u, s, h), D);
  }
  std::fill(dks, dks + td, 0.f);
  std::fill(dvs, dvs + td, 0.f);
  for (int t = 0; t < T_; ++t) {
    int first, last;
    attended_frames(p, t, first, last);
    const int live = first_live_frame(p, t, first);
    const float lse = p.lse_t[stat_index(p, b, t, h, s)];
    const float* qrow = qs + t * D;
    const float* dorow = dos + t * D;
    std::fill(orow, orow + D, 0.f);
    for (int u = first; u <= last; ++u) {
      prob[u] = std::exp(dot(qrow, ks + u * D, D) - lse);
      axpy(orow, prob[u], vs + u * D, D);
      dprob[u] = dot(dorow, vs + u * D, D);
    }
    const float delta = dot(dorow, orow, D);
    if (p.spatial) p.delta_t[stat_index(p, b, t, h, s)] = delta;
    std::fill(dqrow, dqrow + D, 0.f);
    for (int u = first; u <= last; ++u) {
      const float ds = prob[u] * (dprob[u] - delta);  // dq = scale * sum ds k; dk = ds (scale q)
      axpy(dqrow, ds, ks + u * D, D);
      if (u >= live) {
        axpy(dks + u * D, ds, qrow, D);
        axpy(dvs + u * D, prob[u], dorow, D);
      }
    }
    store_row(dq.at(b, t, s, h), dqrow, D, p.scale);
  }
  for (int u = 0; u < T_; ++u) {
    store_row(dk.at(b, u, s, h), dks + u * D, D);
    store_row(dv.at(b, u, s, h), dvs + u * D, D);
  }
}

// One frame-head (b, t, h): dq_s, dk_s, dv_s.
template <typename T>
PYCHOP_CPU_CLONES void spatial_backward_task(const AttentionParams& p, std::vector<float>& buf, int64_t task) {
  const int S = p.tokens, D = p.head_dim;
  const int h = static_cast<int>(task % p.heads);
  const int t = static_cast<int>(task / p.heads % p.frames);
  const int b = static_cast<int>(task / p.heads / p.frames);
  const Rows<T> q(p.q_s), k(p.k_s), v(p.v_s), out(p.out), dout(p.dout), dq(p.dq_s), dk(p.dk_s), dv(p.dv_s);
  const int64_t sd = static_cast<int64_t>(S) * D, bd = static_cast<int64_t>(BLOCK_Q) * D;
  float *ks = buf.data(), *ks_t = ks + sd, *vs_t = ks_t + sd, *dks = vs_t + sd, *dvs = dks + sd;
  float *qb = dvs + sd, *dob = qb + bd, *dqb = dob + bd, *orow = dqb + bd;
  float *prob = orow + D, *dprob = prob + static_cast<int64_t>(BLOCK_Q) * S, *delta = dprob + static_cast<int64_t>(BLOCK_Q) * S;
  gather_frame(k, b, t, h, S, D, ks, ks_t);
  gather_frame(v, b, t, h, S, D, dvs, vs_t);  // dvs is scratch here, zeroed below
  std::fill(dks, dks + sd, 0.f);
  std::fill(dvs, dvs + sd, 0.f);
  for (int s0 = 0; s0 < S; s0 += BLOCK_Q) {
    const int rows = std::min(BLOCK_Q, S - s0);
    for (int i = 0; i < rows; ++i) {
      load_row(qb + i * D, q.at(b, t, s0 + i, h), D, p.scale);
      load_row(dob + i * D, dout.at(b, t, s0 + i, h), D);
      load_row(orow, out.at(b, t, s0 + i, h), D);
      delta[i] = dot(dob + i * D, orow, D) - (p.temporal ? p.delta_t[stat_index(p, b, t, h, s0 + i)] : 0.f);
    }
    row_scores(prob, qb, ks_t, rows, S, D);
    row_scores(dprob, dob, vs_t, rows, S, D);
    std::fill(dqb, dqb + rows * D, 0.f);
    for (int i = 0; i < rows; ++i) {
      const float lse = p.lse_s[stat_index(p, b, t, h, s0 + i)];
      float* pr = prob + static_cast<int64_t>(i) * S;
      float* dp = dprob + static_cast<int64_t>(i) * S;
      for (int j = 0; j < S; ++j) {
        pr[j] = std::exp(pr[j] - lse);
        dp[j] = pr[j] * (dp[j] - delta[i]);  // dS: dq = scale * dS k, dk = dS^T (scale q)
      }
      for (int j = 0; j < S; ++j) {
        const int64_t jd = static_cast<int64_t>(j) * D;
        axpy(dvs + jd, pr[j], dob + i * D, D);
        axpy(dks + jd, dp[j], qb + i * D, D);
        axpy(dqb + i * D, dp[j], ks + jd, D);
      }
    }
    for (int i = 0; i < rows; ++i) store_row(dq.at(b, t, s0 + i, h), dqb + i * D, D, p.scale);
  }
  for (int s = 0; s < S; ++s) {
    store_row(dk.at(b, t, s, h), dks + static_cast<int64_t>(s) * D, D);
    store_row(dv.at(b, t, s, h), dvs + static_cast<int64_t>(s) * D, D);
  }
}

template <typename T>
void backward(const AttentionParams& p) {
  const int S = p.tokens, D = p.head_dim, T_ = p.frames;
  if (p.temporal) {  // first: the spatial pass reads delta_t
    const int64_t tasks = static_cast<int64_t>(p.batch) * S * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(6 * static_cast<size_t>(T_) * D + 2 * D + 2 * T_);
      for (int64_t task = begin; task < end; ++task) temporal_backward_task<T>(p, buf, task);
    });
  }
  if (p.spatial) {
    const int64_t tasks = static_cast<int64_t>(p.batch) * T_ * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(5 * static_cast<size_t>(S) * D + 3 * static_cast<size_t>(BLOCK_Q) * D + D +
                             2 * static_cast<size_t>(BLOCK_Q) * S + BLOCK_Q);
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

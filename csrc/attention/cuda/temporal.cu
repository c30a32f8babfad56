// Temporal branch: per token-head (b, s, h), attention over the T frames.
//
// Layout: a group of G lanes (a power of two) owns one token-head; lane l holds elements [l*E, l*E + E) of
// the head dim, so G*E >= D and a warp serves 32/G token-heads at once. G and E are picked per D so that
// few lanes idle (D = 40: 16 lanes x 4; D = 128: 32 x 4), by PYCHOP_TEMPORAL_LANES_SWITCH (head_dim_switch.h).
// Dot products reduce with shuffles inside the group; softmax is online over key frames, all in float32.
// Consecutive groups take consecutive heads, then tokens, so loads of a frame's rows coalesce in the
// (B, T, S, H, D) layout.
#include "attention/cuda/branches.h"
#include "attention/cuda/common.cuh"
#include "attention/cuda/head_dim_switch.h"

#include <cmath>

namespace pychop {
namespace cuda {
namespace {

constexpr int THREADS = 128;

template <typename T, int E>
__device__ __forceinline__ void load_part(float (&dst)[E], const T* row, int d0, int D, float factor = 1.f) {
#pragma unroll
  for (int e = 0; e < E; ++e) dst[e] = d0 + e < D ? to_float(row[d0 + e]) * factor : 0.f;
}

template <typename T, int E>
__device__ __forceinline__ void store_part(T* row, const float (&src)[E], int d0, int D, float factor = 1.f) {
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (d0 + e < D) row[d0 + e] = from_float<T>(src[e] * factor);
}

template <int E>
__device__ __forceinline__ float dot_part(const float (&x)[E], const float (&y)[E]) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) sum += x[e] * y[e];
  return sum;
}

// The token-head of this lane's group. Groups past the end compute on the last token-head (so that every
// lane of the warp takes part in the shuffles) and store nothing.
struct TokenHead {
  int b, s, h;
  bool active;
};

template <int G>
__device__ __forceinline__ TokenHead token_head(const AttentionParams& p) {
  const int64_t count = static_cast<int64_t>(p.batch) * p.tokens * p.heads;
  int64_t g = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) / G;
  const bool active = g < count;
  if (!active) g = count - 1;
  return {static_cast<int>(g / (static_cast<int64_t>(p.tokens) * p.heads)),
          static_cast<int>(g / p.heads % p.tokens), static_cast<int>(g % p.heads), active};
}

template <typename T, int G, int E>
__global__ void __launch_bounds__(THREADS) temporal_fwd_kernel(const AttentionParams p) {
  const TokenHead th = token_head<G>(p);
  const int d0 = (threadIdx.x % G) * E, D = p.head_dim;
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), out(p.out_t);
  for (int t = 0; t < p.frames; ++t) {
    int first, last;
    attended_frames(p, t, first, last);
    float qr[E], kr[E], vr[E], acc[E];
    load_part(qr, q.at(th.b, t, th.s, th.h), d0, D, p.scale);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    float row_max = -INFINITY, row_sum = 0.f;
    for (int u = first; u <= last; ++u) {
      load_part(kr, k.at(th.b, u, th.s, th.h), d0, D);
      load_part(vr, v.at(th.b, u, th.s, th.h), d0, D);
      const float score = group_sum(dot_part(qr, kr), G);
      const float new_max = fmaxf(row_max, score);
      const float rescale = __expf(row_max - new_max), prob = __expf(score - new_max);
      row_sum = row_sum * rescale + prob;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = acc[e] * rescale + prob * vr[e];
      row_max = new_max;
    }
    if (th.active) {
      store_part(out.at(th.b, t, th.s, th.h), acc, d0, D, 1.f / row_sum);
      if (threadIdx.x % G == 0) p.lse_t[stat_index(p, th.b, t, th.h, th.s)] = row_max + __logf(row_sum);
    }
  }
}

// Pass 1, query frame by query frame: recomputes o_t, writes delta_t and dq_t. Pass 2, key frame by key
// frame: accumulates dk_t and dv_t over the query frames whose grad window lets it through.
template <typename T, int G, int E>
__global__ void __launch_bounds__(THREADS) temporal_bwd_kernel(const AttentionParams p) {
  const TokenHead th = token_head<G>(p);
  const int d0 = (threadIdx.x % G) * E, D = p.head_dim;
  const Rows<T> q(p.q_t), k(p.k_t), v(p.v_t), dout(p.dout_t), dq(p.dq_t), dk(p.dk_t), dv(p.dv_t);
  const bool leader = threadIdx.x % G == 0;
  float qr[E], kr[E], vr[E], dor[E], acc[E], grad[E];
  for (int t = 0; t < p.frames; ++t) {
    int first, last;
    attended_frames(p, t, first, last);
    const float lse = p.lse_t[stat_index(p, th.b, t, th.h, th.s)];
    load_part(qr, q.at(th.b, t, th.s, th.h), d0, D, p.scale);
    load_part(dor, dout.at(th.b, t, th.s, th.h), d0, D);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
    for (int u = first; u <= last; ++u) {  // o_t
      load_part(kr, k.at(th.b, u, th.s, th.h), d0, D);
      load_part(vr, v.at(th.b, u, th.s, th.h), d0, D);
      const float prob = probability(group_sum(dot_part(qr, kr), G) - lse);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += prob * vr[e];
    }
    const float delta = group_sum(dot_part(dor, acc), G);
#pragma unroll
    for (int e = 0; e < E; ++e) grad[e] = 0.f;
    for (int u = first; u <= last; ++u) {  // dq_t = scale * sum_u prob (dout . v_u - delta) k_u
      load_part(kr, k.at(th.b, u, th.s, th.h), d0, D);
      load_part(vr, v.at(th.b, u, th.s, th.h), d0, D);
      const float prob = probability(group_sum(dot_part(qr, kr), G) - lse);
      const float ds = prob * (group_sum(dot_part(dor, vr), G) - delta);
#pragma unroll
      for (int e = 0; e < E; ++e) grad[e] += ds * kr[e];
    }
    if (th.active) {
      store_part(dq.at(th.b, t, th.s, th.h), grad, d0, D, p.scale);
      if (leader) p.delta_t[stat_index(p, th.b, t, th.h, th.s)] = delta;
    }
  }
  __syncwarp();
  for (int u = 0; u < p.frames; ++u) {
    load_part(kr, k.at(th.b, u, th.s, th.h), d0, D);
    load_part(vr, v.at(th.b, u, th.s, th.h), d0, D);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = grad[e] = 0.f;  // acc: dv, grad: dk
    for (int t = 0; t < p.frames; ++t) {
      int first, last;
      attended_frames(p, t, first, last);
      if (u < first_live_frame(p, t, first) || u > last) continue;  // uniform across the warp
      const int64_t row = stat_index(p, th.b, t, th.h, th.s);
      load_part(qr, q.at(th.b, t, th.s, th.h), d0, D, p.scale);
      load_part(dor, dout.at(th.b, t, th.s, th.h), d0, D);
      const float prob = probability(group_sum(dot_part(qr, kr), G) - p.lse_t[row]);
      // a clamped group (past the last token-head) reads no delta_t: another block may be writing that row
      const float delta_r = th.active ? p.delta_t[row] : 0.f;
      const float ds = prob * (group_sum(dot_part(dor, vr), G) - delta_r);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        grad[e] += ds * qr[e];
        acc[e] += prob * dor[e];
      }
    }
    if (th.active) {
      store_part(dk.at(th.b, u, th.s, th.h), grad, d0, D);
      store_part(dv.at(th.b, u, th.s, th.h), acc, d0, D);
    }
  }
}

template <typename T, int G, int E>
const char* launch(const AttentionParams& p, bool backward, void* stream) {
  const int64_t lanes = static_cast<int64_t>(p.batch) * p.tokens * p.heads * G;
  const unsigned blocks = static_cast<unsigned>((lanes + THREADS - 1) / THREADS);
  auto kernel = backward ? temporal_bwd_kernel<T, G, E> : temporal_fwd_kernel<T, G, E>;
  kernel<<<blocks, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_error();
}

// Lanes per token-head and elements per lane for head dim D: head_dim_switch.h.
template <typename T>
const char* launch_for_head_dim(const AttentionParams& p, bool backward, void* stream) {
  return PYCHOP_TEMPORAL_LANES_SWITCH(p.head_dim, [&] { return launch<T, LANES, PER_LANE>(p, backward, stream); });
}

}  // namespace

const char* launch_temporal_fwd(const AttentionParams& p, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return launch_for_head_dim<decltype(tag)>(p, false, stream); });
}

const char* launch_temporal_bwd(const AttentionParams& p, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return launch_for_head_dim<decltype(tag)>(p, true, stream); });
}

}  // namespace cuda
}  // namespace pychop

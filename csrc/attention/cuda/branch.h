// One branch of the fused attention as the CUDA kernels see it: a batch of independent attentions ("problems")
// along one axis of the (B, T, S, H, D) tensors. Spatial: problem (b, t, h), its rows the S tokens of frame t,
// no mask. Temporal: problem (b, s, h), its rows the T frames of token s, with the causal, window and
// grad-window masks. One kernel family serves both: the temporal branch is the spatial one with rows strided by
// the frame stride. Plain C++ (host and device): tests/test_extension_build.py checks the index arithmetic and
// the block ranges here against brute force on the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "attention/params.h"

namespace pychop {

enum class Axis : int { Spatial = 0, Temporal = 1 };

// A tensor seen along the axis: row r of problem (b, x, h) starts at element b*sb + x*sx + h*sh + r*srow of data
// (x is t for the spatial axis, s for the temporal one); its D elements are contiguous.
struct AxisTensor {
  void* data = nullptr;
  int64_t sb = 0, sx = 0, sh = 0, srow = 0;
  bool aligned = false;  // every row starts on 16 bytes: data and the four strides are multiples of 16 bytes

  PYCHOP_HOST_DEVICE int64_t row_offset(int b, int x, int h, int r) const {
    return b * sb + x * sx + h * sh + r * srow;
  }
};

struct Branch {
  int batch = 0, outer = 0, heads = 0;  // problem index (b * outer + x) * heads + h
  int rows = 0, head_dim = 0;
  float scale = 1.f;
  bool causal = false;  // the masks along the rows (params.h: attended_range, first_live_row); spatial: none
  int window = 0, grad_window = 0;
  AxisTensor q, k, v, out;        // out: the branch's output (forward), or o (backward, when delta is taken from it)
  AxisTensor lse;                 // float32 (B, T, H, S), one value per row
  AxisTensor dout, dq, dk, dv;    // backward
  AxisTensor delta;               // backward float32 scratch (params.h), one value per row

  PYCHOP_HOST_DEVICE int64_t problems() const { return static_cast<int64_t>(batch) * outer * heads; }

  PYCHOP_HOST_DEVICE void problem(int64_t index, int& b, int& x, int& h) const {
    h = static_cast<int>(index % heads);
    x = static_cast<int>(index / heads % outer);
    b = static_cast<int>(index / heads / outer);
  }

  PYCHOP_HOST_DEVICE bool attends(int i, int j) const {
    int first, last;
    attended_range(causal, window, rows, i, first, last);
    return first <= j && j <= last && j < rows;
  }

  // Whether key row j receives gradient from query row i (it is attended and not detached by the grad window).
  PYCHOP_HOST_DEVICE bool live(int i, int j) const {
    int first, last;
    attended_range(causal, window, rows, i, first, last);
    return first_live_row(grad_window, i, first) <= j && j <= last && j < rows;
  }

  // Inclusive key rows [first, last] attended by some query row of [i0, i1] (both ends never decrease with i).
  PYCHOP_HOST_DEVICE void key_range(int i0, int i1, int& first, int& last) const {
    int unused;
    attended_range(causal, window, rows, i0, first, unused);
    attended_range(causal, window, rows, i1, unused, last);
    if (last > rows - 1) last = rows - 1;
  }

  // Inclusive query rows [first, last] attending to some key row of [j0, j1].
  PYCHOP_HOST_DEVICE void query_range(int j0, int j1, int& first, int& last) const {
    first = causal ? j0 : 0;
    last = window > 0 && j1 + window - 1 < rows - 1 ? j1 + window - 1 : rows - 1;
  }

  // False only if every attended pair of a query row <= i1 and a key row >= j0 is live, so that the backward may
  // skip masking the grad window for a query block ending at i1 and a key block starting at j0.
  PYCHOP_HOST_DEVICE bool detaches_any(int i1, int j0) const { return grad_window > 0 && j0 <= i1 - grad_window; }
};

// A (B, T, S, H, D) TensorRef of element size `elem` along `axis`.
inline AxisTensor along(const TensorRef& r, Axis axis, size_t elem) {
  AxisTensor a;
  a.data = r.data;
  a.sb = r.stride_b;
  a.sx = axis == Axis::Spatial ? r.stride_t : r.stride_s;
  a.sh = r.stride_h;
  a.srow = axis == Axis::Spatial ? r.stride_s : r.stride_t;
  const auto on16 = [&](int64_t stride) { return stride * static_cast<int64_t>(elem) % 16 == 0; };
  a.aligned = reinterpret_cast<uintptr_t>(r.data) % 16 == 0 && on16(r.stride_b) && on16(r.stride_t) &&
              on16(r.stride_s) && on16(r.stride_h);
  return a;
}

// A contiguous float32 (B, T, H, S) statistics tensor as a TensorRef (D = 1).
inline TensorRef stats_ref(float* data, const AttentionParams& p) {
  const int64_t S = p.tokens, H = p.heads;
  return {data, p.frames * H * S, H * S, 1, S};
}

// The branch `axis` of the call `p`; elem is the size of the input dtype.
inline Branch make_branch(const AttentionParams& p, Axis axis, size_t elem) {
  const bool spatial = axis == Axis::Spatial;
  Branch br;
  br.batch = p.batch;
  br.outer = spatial ? p.frames : p.tokens;
  br.heads = p.heads;
  br.rows = spatial ? p.tokens : p.frames;
  br.head_dim = p.head_dim;
  br.scale = p.scale;
  br.causal = !spatial && p.causal;
  br.window = spatial ? 0 : p.window;
  br.grad_window = spatial ? 0 : p.grad_window;
  br.q = along(spatial ? p.q_s : p.q_t, axis, elem);
  br.k = along(spatial ? p.k_s : p.k_t, axis, elem);
  br.v = along(spatial ? p.v_s : p.v_t, axis, elem);
  br.out = along(spatial ? p.out : p.out_t, axis, elem);
  br.lse = along(stats_ref(spatial ? p.lse_s : p.lse_t, p), axis, sizeof(float));
  br.dout = along(spatial ? p.dout : p.dout_t, axis, elem);
  br.dq = along(spatial ? p.dq_s : p.dq_t, axis, elem);
  br.dk = along(spatial ? p.dk_s : p.dk_t, axis, elem);
  br.dv = along(spatial ? p.dv_s : p.dv_t, axis, elem);
  br.delta = along(stats_ref(p.delta, p), axis, sizeof(float));
  return br;
}

}  // namespace pychop

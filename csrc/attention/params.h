// Parameters of the fused parallel spatial-temporal attention kernels (CPU and CUDA).
//
// Plain C++ on purpose: no torch, no CUDA headers, so the same struct crosses from the torch binding into
// .cu files compiled by nvcc alone. Every tensor has the (B, T, S, H, D) layout with a D stride of 1;
// strides are in elements. Statistics (lse, delta) are float32, contiguous (B, T, H, S).
#pragma once

#include <cstdint>

namespace pychop {

// The largest head dim D the kernels take (binding.cpp checks it and exposes it as pychop._C.MAX_HEAD_DIM; the
// Python side's is kernels/limits.py, and a test ties the two).
constexpr int MAX_HEAD_DIM = 256;

enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// A (B, T, S, H, D) tensor with a unit D stride. data is null for a tensor the call does not use.
struct TensorRef {
  void* data = nullptr;
  int64_t stride_b = 0, stride_t = 0, stride_s = 0, stride_h = 0;
};

struct AttentionParams {
  int batch = 0, frames = 0, tokens = 0, heads = 0, head_dim = 0;  // B, T, S, H, D
  ScalarKind dtype = ScalarKind::Float32;
  float scale = 1.f;

  bool spatial = false;   // the spatial branch is computed (q_s, k_s, v_s, lse_s set)
  bool temporal = false;  // the temporal branch is computed (q_t, k_t, v_t, lse_t set)
  bool stacked = false;   // both branches, written apart: o_s to out, o_t to out_t (else out = o_s + o_t)
  bool causal = false;    // key frames t' <= t only
  int window = 0;         // > 0: key frames t - window < t' <= t (implies causal)
  int grad_window = 0;    // > 0 (backward): k_t, v_t of frames t' <= t - grad_window get no gradient from t

  // Forward inputs and outputs. out_t is where o_t goes: out itself unless stacked.
  TensorRef q_s, k_s, v_s, q_t, k_t, v_t;
  TensorRef out, out_t;
  float* lse_s = nullptr;  // (B, T, H, S) natural-log logsumexp of the scaled spatial scores
  float* lse_t = nullptr;  // (B, T, H, S) the same for the temporal scores

  // Backward: the output gradient (stacked: dout of o_s, dout_t of o_t; else dout_t is dout), the input
  // gradients (written, never accumulated into) and scratch.
  TensorRef dout, dout_t;
  TensorRef dq_s, dk_s, dv_s, dq_t, dk_t, dv_t;
  float* delta = nullptr;  // scratch (B, T, H, S), CUDA only: delta = rowsum(dO * o) of a branch whose rows span
                           // several key blocks (one branch at a time)
};

#ifdef __CUDACC__
#define PYCHOP_HOST_DEVICE __host__ __device__
#else
#define PYCHOP_HOST_DEVICE
#endif

// Inclusive range [first, last] of the key rows that query row i of `rows` attends to, along an axis with these
// masks (the temporal one; the spatial axis has none: every row).
inline PYCHOP_HOST_DEVICE void attended_range(bool causal, int window, int rows, int i, int& first, int& last) {
  first = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
  last = causal ? i : rows - 1;
}

// First key row whose keys and values receive gradient from query row i (rows before it are constants).
inline PYCHOP_HOST_DEVICE int first_live_row(int grad_window, int i, int first) {
  return grad_window > 0 && i - grad_window + 1 > first ? i - grad_window + 1 : first;
}

// Inclusive range [first, last] of key frames that query frame t attends to.
inline PYCHOP_HOST_DEVICE void attended_frames(const AttentionParams& p, int t, int& first, int& last) {
  attended_range(p.causal, p.window, p.frames, t, first, last);
}

// First key frame whose k_t, v_t receive gradient from query frame t (frames before it are constants).
inline PYCHOP_HOST_DEVICE int first_live_frame(const AttentionParams& p, int t, int first) {
  return first_live_row(p.grad_window, t, first);
}

}  // namespace pychop

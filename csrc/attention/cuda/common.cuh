// Device helpers shared by the CUDA kernels of the fused attention: element types, strided (B, T, S, H, D)
// access, statistics indexing, warp reductions. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/params.h"

namespace pychop {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A probability recomputed in a backward, exp(x) for x = score - logsumexp, <= 0 in exact arithmetic. Rounding
// puts x above 0 by a few units of the score's last place, which a huge scale magnifies until exp overflows:
// x is clamped to log 2 (a probability stays at most 2; the clamp binds only where rounding reaches a unit of x).
// NaN stays NaN.
__device__ __forceinline__ float probability(float x) {
  constexpr float kLn2 = 0.693147181f;
  return __expf(x > kLn2 ? kLn2 : x);
}

// Element (b, t, s, h, 0) of a TensorRef, typed.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, st, ss, sh;
  __host__ __device__ explicit Rows(const TensorRef& r)
      : data(static_cast<T*>(r.data)), sb(r.stride_b), st(r.stride_t), ss(r.stride_s), sh(r.stride_h) {}
  __device__ __forceinline__ T* at(int b, int t, int s, int h) const {
    return data + b * sb + t * st + s * ss + h * sh;
  }
};

// Index of row (b, t, h, s) in a contiguous (B, T, H, S) statistics tensor.
__device__ __forceinline__ int64_t stat_index(const AttentionParams& p, int b, int t, int h, int s) {
  return ((static_cast<int64_t>(b) * p.frames + t) * p.heads + h) * p.tokens + s;
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float group_max(float x, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Calls fn.template operator()<T>() with the element type of `dtype`.
template <typename Fn>
const char* dispatch_dtype(ScalarKind dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarKind::Float16: return fn(__half{});
    case ScalarKind::BFloat16: return fn(__nv_bfloat16{});
    default: return fn(float{});
  }
}

}  // namespace cuda
}  // namespace pychop

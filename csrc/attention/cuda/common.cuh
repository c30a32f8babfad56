// Helpers shared by the CUDA kernels of the fused attention: element types, warp reductions, runtime errors.
// No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

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

// exp(x) for x = score - logsumexp of a probability recomputed in a backward, <= 0 in exact arithmetic. Rounding
// puts x above 0 by a few units of the score's last place, which a huge scale magnifies until exp overflows:
// x is clamped to log 2 (a probability stays at most 2; the clamp binds only where rounding reaches a unit of x).
// NaN stays NaN.
__device__ __forceinline__ float recomputed_probability(float x) {
  constexpr float kLn2 = 0.693147181f;
  return __expf(x > kLn2 ? kLn2 : x);
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

// The launch error of the last kernel, or nullptr; clears the runtime's error slot either way.
inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// A failed runtime call as the launchers report it: "<call>: <CUDA's reason>". The failure is also cleared from
// the runtime's error slot, where the next kernel launch (torch's) would otherwise find it and fail.
inline const char* runtime_error(const char* call, cudaError_t error) {
  if (error == cudaSuccess) return nullptr;
  cudaGetLastError();
  static thread_local char message[256];
  std::snprintf(message, sizeof(message), "%s: %s", call, cudaGetErrorString(error));
  return message;
}

// The most dynamic shared memory a block may opt in to on the current device (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 227 KiB on sm_90 and sm_100, 163 KiB on sm_80, 99 KiB on sm_86, sm_89 and sm_120), or less where the environment
// variable PYCHOP_CUDA_SHARED_MEMORY_LIMIT (bytes) says so: the tests take a 99 KiB GPU's blocks on any GPU.
inline const char* max_shared_memory(int& bytes) {
  int device = 0;
  if (const char* error = runtime_error("cudaGetDevice", cudaGetDevice(&device))) return error;
  if (const char* error = runtime_error("cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)",
                                        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)))
    return error;
  if (const char* limit = std::getenv("PYCHOP_CUDA_SHARED_MEMORY_LIMIT")) {
    const long value = std::strtol(limit, nullptr, 10);
    if (value > 0 && value < bytes) bytes = static_cast<int>(value);
  }
  return nullptr;
}

// Lets `kernel` take `bytes` of dynamic shared memory (needed past 48 KiB).
template <typename Kernel>
const char* allow_shared_memory(Kernel kernel, size_t bytes) {
  return runtime_error("cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)",
                       cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)));
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

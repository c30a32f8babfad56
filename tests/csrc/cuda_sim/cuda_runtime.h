// CPU stand-in for the CUDA runtime calls csrc/attention/cuda makes (see cuda_sim.h).
#pragma once

#include "cuda_sim.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef struct CUstream_st* cudaStream_t;

inline cudaError_t sim_failed(cudaError_t error) {
  ::sim::device.last_error = error;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

inline cudaError_t cudaGetLastError() {
  const auto error = static_cast<cudaError_t>(::sim::device.last_error);
  ::sim::device.last_error = cudaSuccess;
  return error;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0) return sim_failed(cudaErrorInvalidValue);
  *value = ::sim::device.optin_shared_memory;
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (::sim::device.fail_set_attribute > 0) {
    --::sim::device.fail_set_attribute;
    return sim_failed(cudaErrorInvalidValue);
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > ::sim::device.optin_shared_memory)
    return sim_failed(cudaErrorInvalidValue);
  ::sim::device.max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

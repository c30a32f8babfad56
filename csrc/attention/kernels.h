// Entry points of the fused parallel spatial-temporal attention kernels. The binding validates the tensors,
// fills an AttentionParams and calls these; they assume what the binding checked.
#pragma once

#include "attention/params.h"

namespace pychop {

// CPU (csrc/attention/cpu/attention_cpu.cpp): at::parallel_for over the intra-op thread pool.
void parallel_st_attention_fwd_cpu(const AttentionParams& params);
void parallel_st_attention_bwd_cpu(const AttentionParams& params);

// CUDA (csrc/attention/cuda/*.cu): enqueue on `stream` (a cudaStream_t) on the current device.
// Return an error string on a launch failure, or nullptr.
const char* launch_parallel_st_attention_fwd(const AttentionParams& params, void* stream);
const char* launch_parallel_st_attention_bwd(const AttentionParams& params, void* stream);
// Whether the backward needs the scratch params.delta (a branch's rows span several key blocks on the current
// device); an error string if the device could not be queried.
const char* cuda_backward_needs_scratch(const AttentionParams& params, bool& needs);

}  // namespace pychop

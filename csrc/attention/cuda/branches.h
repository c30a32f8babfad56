// The per-branch CUDA launchers that launch.cu strings together (one .cu file each).
#pragma once

#include "attention/params.h"

namespace pychop {
namespace cuda {

// Temporal branch: writes out_t = o_t and lse_t (forward); dq_t, dk_t, dv_t and delta_t (backward).
const char* launch_temporal_fwd(const AttentionParams& p, void* stream);
const char* launch_temporal_bwd(const AttentionParams& p, void* stream);

// Spatial branch: writes (or, with accumulate, adds o_s into) out and lse_s (forward); dq_s, dk_s, dv_s from
// delta_s = rowsum(dout * o_s): rowsum(dout * out) - delta_t when out holds the sum (backward).
const char* launch_spatial_fwd(const AttentionParams& p, bool accumulate, void* stream);
const char* launch_spatial_bwd(const AttentionParams& p, void* stream);

}  // namespace cuda
}  // namespace pychop

// Entry points of the CUDA kernels: the order of the branch launches on one stream.
#include "attention/cuda/branches.h"
#include "attention/kernels.h"

namespace pychop {

// Temporal first (out_t = o_t), then spatial writes o_s to out, or adds it there when out_t is out.
const char* launch_parallel_st_attention_fwd(const AttentionParams& params, void* stream) {
  if (params.temporal)
    if (const char* error = cuda::launch_temporal_fwd(params, stream)) return error;
  if (params.spatial)
    return cuda::launch_spatial_fwd(params, /*accumulate=*/params.temporal && !params.stacked, stream);
  return nullptr;
}

// Temporal first: it recomputes o_t and leaves delta_t = rowsum(dout_t * o_t) for the spatial branch.
const char* launch_parallel_st_attention_bwd(const AttentionParams& params, void* stream) {
  if (params.temporal)
    if (const char* error = cuda::launch_temporal_bwd(params, stream)) return error;
  if (params.spatial) return cuda::launch_spatial_bwd(params, stream);
  return nullptr;
}

}  // namespace pychop

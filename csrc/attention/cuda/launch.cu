// Entry points of the CUDA kernels: each branch as a batch of attentions along its axis (branch.h), launched
// in order on one stream.
#include "attention/cuda/branches.h"
#include "attention/kernels.h"

namespace pychop {
namespace {

size_t element_size(ScalarKind dtype) { return dtype == ScalarKind::Float32 ? 4 : 2; }

Branch branch(const AttentionParams& p, Axis axis) { return make_branch(p, axis, element_size(p.dtype)); }

}  // namespace

// Temporal first (out_t = o_t), then spatial writes o_s to out, or adds it there when out_t is out.
const char* launch_parallel_st_attention_fwd(const AttentionParams& params, void* stream) {
  if (params.temporal)
    if (const char* error = cuda::launch_branch_fwd(branch(params, Axis::Temporal), params.dtype, false, stream))
      return error;
  if (params.spatial)
    return cuda::launch_branch_fwd(branch(params, Axis::Spatial), params.dtype, params.temporal && !params.stacked,
                                   stream);
  return nullptr;
}

// Each branch on its own. out holds a branch's own output when it is the only branch, or (the spatial one's)
// when stacked; a summed output serves neither branch's delta (attention_bwd.cu).
const char* launch_parallel_st_attention_bwd(const AttentionParams& params, void* stream) {
  if (params.temporal)
    if (const char* error =
            cuda::launch_branch_bwd(branch(params, Axis::Temporal), params.dtype, !params.spatial, stream))
      return error;
  if (params.spatial)
    return cuda::launch_branch_bwd(branch(params, Axis::Spatial), params.dtype, !params.temporal || params.stacked,
                                   stream);
  return nullptr;
}

const char* cuda_backward_needs_scratch(const AttentionParams& params, bool& needs) {
  needs = false;
  for (const Axis axis : {Axis::Spatial, Axis::Temporal}) {
    if (!(axis == Axis::Spatial ? params.spatial : params.temporal)) continue;
    bool branch_needs = false;
    if (const char* error = cuda::backward_needs_scratch(branch(params, axis), params.dtype, branch_needs))
      return error;
    needs = needs || branch_needs;
  }
  return nullptr;
}

}  // namespace pychop

// The per-branch CUDA launchers that launch.cu strings together. One kernel family serves both branches
// (branch.h): attention_fwd.cu and attention_bwd.cu.
#pragma once

#include "attention/cuda/branch.h"

namespace pychop {
namespace cuda {

// Writes br.out (or, with add, adds the branch's output into it) and br.lse.
const char* launch_branch_fwd(const Branch& br, ScalarKind dtype, bool add, void* stream);

// Writes br.dq, br.dk, br.dv. `output_saved`: br.out holds this branch's own output (rounded to its dtype), from
// which delta may be taken; otherwise delta is exact: rowsum(P dP), in float32.
const char* launch_branch_bwd(const Branch& br, ScalarKind dtype, bool output_saved, void* stream);

// Whether launch_branch_bwd needs br.delta (it does when a problem spans several key blocks).
const char* backward_needs_scratch(const Branch& br, ScalarKind dtype, bool& needs);

}  // namespace cuda
}  // namespace pychop

// pychop._C: the binding of the fused parallel spatial-temporal attention kernels.
//
// Validates what the kernels assume (dtype, device, shape, unit D stride, head dim), fills AttentionParams,
// allocates float32 scratch, and calls the CPU kernels or enqueues the CUDA launchers on the stream passed
// from Python (an int: the current stream of the tensors' device, torch.cuda.current_stream().cuda_stream,
// which the scratch is allocated for; that device is made current here). Outputs are allocated by the caller
// (pychop/ops/extension_attention.py) and written here.
// Needs no CUDA or ATen-CUDA headers: the CUDA part is linked in when built with PYCHOP_WITH_CUDA.
#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>

#include <algorithm>

#include "attention/kernels.h"

namespace pychop {
namespace {

using OptTensor = c10::optional<at::Tensor>;

struct Group {  // the tensors of one call, checked against the first
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;

  void check(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 5, name, " must have shape (B, T, S, H, D), got ", x.sizes());
    TORCH_CHECK(x.stride(-1) == 1, name, " must have a last-dimension stride of 1, got ", x.stride(-1));
    if (first == nullptr) {
      TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                  name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
      TORCH_CHECK(x.is_cpu() || x.is_cuda(), name, " must be on a CPU or CUDA device, got ", x.device());
      TORCH_CHECK(x.size(4) <= MAX_HEAD_DIM, name, " has head dim ", x.size(4), "; at most ", MAX_HEAD_DIM,
                  " is supported");
      for (int d = 0; d < 5; ++d) TORCH_CHECK(x.size(d) >= 1, name, " has an empty dimension: ", x.sizes());
      first = &x;
      first_name = name;
      return;
    }
    TORCH_CHECK(x.sizes() == first->sizes(), name, " has shape ", x.sizes(), ", expected ", first->sizes(),
                " like ", first_name);
    TORCH_CHECK(x.scalar_type() == first->scalar_type(), name, " has dtype ", x.scalar_type(), ", expected ",
                first->scalar_type(), " like ", first_name);
    TORCH_CHECK(x.device() == first->device(), name, " is on ", x.device(), ", expected ", first->device(),
                " like ", first_name);
  }

  TensorRef ref(const OptTensor& x, const char* name) {
    if (!x.has_value()) return {};
    check(*x, name);
    return {x->data_ptr(), x->stride(0), x->stride(1), x->stride(2), x->stride(3)};
  }

  float* stats(const OptTensor& x, const char* name) {
    if (!x.has_value()) return nullptr;
    TORCH_CHECK(first != nullptr, name, " given without the tensors of its branch");
    const auto B = first->size(0), T = first->size(1), S = first->size(2), H = first->size(3);
    TORCH_CHECK(x->scalar_type() == at::kFloat, name, " must be float32, got ", x->scalar_type());
    TORCH_CHECK(x->device() == first->device(), name, " is on ", x->device(), ", expected ", first->device());
    TORCH_CHECK(x->sizes() == at::IntArrayRef({B, T, H, S}) && x->is_contiguous(), name,
                " must be a contiguous (B, T, H, S) = (", B, ", ", T, ", ", H, ", ", S, ") tensor, got ",
                x->sizes());
    return x->data_ptr<float>();
  }
};

// A window or grad window (>= 0, 0: none) as the kernels' int: one of T frames or more means the same as T
// (every lag t - t' < T), so it is clamped to T before narrowing (2**32 + 1 must not become 1).
int frame_count_clamp(int64_t window, int frames) { return static_cast<int>(std::min<int64_t>(window, frames)); }

ScalarKind scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default: return ScalarKind::Float32;
  }
}

// The parameters shared by forward and backward: inputs, output, the branches' statistics and the options.
AttentionParams make_params(Group& group, const OptTensor& q_s, const OptTensor& k_s, const OptTensor& v_s,
                            const OptTensor& q_t, const OptTensor& k_t, const OptTensor& v_t,
                            const at::Tensor& out, const OptTensor& lse_s, const OptTensor& lse_t,
                            double scale, bool causal, int64_t window, bool stacked) {
  const bool spatial = q_s.has_value(), temporal = q_t.has_value();
  TORCH_CHECK(spatial || temporal, "at least one branch (q_s, k_s, v_s or q_t, k_t, v_t) must be given");
  TORCH_CHECK(spatial == (k_s.has_value() && v_s.has_value()), "q_s, k_s, v_s must be given together");
  TORCH_CHECK(temporal == (k_t.has_value() && v_t.has_value()), "q_t, k_t, v_t must be given together");
  TORCH_CHECK(window >= 0, "temporal_window must be >= 1 or 0 (none), got ", window);
  TORCH_CHECK(!stacked || (spatial && temporal), "stacked branches need both branches");
  AttentionParams p;
  p.q_s = group.ref(q_s, "q_s");
  p.k_s = group.ref(k_s, "k_s");
  p.v_s = group.ref(v_s, "v_s");
  p.q_t = group.ref(q_t, "q_t");
  p.k_t = group.ref(k_t, "k_t");
  p.v_t = group.ref(v_t, "v_t");
  p.out = group.ref(out, "out");
  p.out_t = p.out;
  const at::Tensor& x = *group.first;
  p.batch = x.size(0);
  p.frames = x.size(1);
  p.tokens = x.size(2);
  p.heads = x.size(3);
  p.head_dim = x.size(4);
  p.dtype = scalar_kind(x.scalar_type());
  p.scale = static_cast<float>(scale);
  p.spatial = spatial;
  p.temporal = temporal;
  p.stacked = stacked;
  p.causal = causal || window > 0;
  p.window = frame_count_clamp(window, p.frames);
  p.lse_s = group.stats(lse_s, "lse_s");
  p.lse_t = group.stats(lse_t, "lse_t");
  TORCH_CHECK(p.spatial == (p.lse_s != nullptr) && p.temporal == (p.lse_t != nullptr),
              "lse_s / lse_t must be given exactly for the branches computed");
  return p;
}

#ifdef PYCHOP_WITH_CUDA
void check_launch(const char* error) { TORCH_CHECK(error == nullptr, "pychop._C CUDA launch failed: ", error); }
#else
const char* no_cuda() { return "pychop._C was built without CUDA"; }
#endif

// Writes out (B, T, S, H, D) and the statistics of the branches given; with out_t, o_s to out and o_t to out_t.
void forward(const OptTensor& q_s, const OptTensor& k_s, const OptTensor& v_s, const OptTensor& q_t,
             const OptTensor& k_t, const OptTensor& v_t, const at::Tensor& out, const OptTensor& out_t,
             const OptTensor& lse_s, const OptTensor& lse_t, double scale, bool causal, int64_t window,
             int64_t stream) {
  const c10::DeviceGuard device(out.device());
  Group group;
  AttentionParams p = make_params(group, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, scale, causal, window,
                                  out_t.has_value());
  if (p.stacked) p.out_t = group.ref(out_t, "out_t");
  if (out.is_cpu()) {
    parallel_st_attention_fwd_cpu(p);
    return;
  }
#ifdef PYCHOP_WITH_CUDA
  check_launch(launch_parallel_st_attention_fwd(p, reinterpret_cast<void*>(stream)));
#else
  TORCH_CHECK(false, no_cuda());
#endif
}

// Writes the gradients of the branches given (dq_s ... dv_t), from dout and the forward's out (o_s when stacked)
// and statistics; with dout_t, dout is the gradient of o_s and dout_t that of o_t.
void backward(const at::Tensor& dout, const OptTensor& dout_t, const OptTensor& q_s, const OptTensor& k_s,
              const OptTensor& v_s, const OptTensor& q_t, const OptTensor& k_t, const OptTensor& v_t,
              const at::Tensor& out, const OptTensor& lse_s, const OptTensor& lse_t, const OptTensor& dq_s,
              const OptTensor& dk_s, const OptTensor& dv_s, const OptTensor& dq_t, const OptTensor& dk_t,
              const OptTensor& dv_t, double scale, bool causal, int64_t window, int64_t grad_window,
              int64_t stream) {
  const c10::DeviceGuard device(out.device());
  Group group;
  AttentionParams p = make_params(group, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, scale, causal, window,
                                  dout_t.has_value());
  TORCH_CHECK(grad_window >= 0, "temporal_grad_window must be >= 1 or 0 (none), got ", grad_window);
  p.grad_window = frame_count_clamp(grad_window, p.frames);
  p.dout = group.ref(dout, "dout");
  p.dout_t = p.stacked ? group.ref(dout_t, "dout_t") : p.dout;
  p.dq_s = group.ref(dq_s, "dq_s");
  p.dk_s = group.ref(dk_s, "dk_s");
  p.dv_s = group.ref(dv_s, "dv_s");
  p.dq_t = group.ref(dq_t, "dq_t");
  p.dk_t = group.ref(dk_t, "dk_t");
  p.dv_t = group.ref(dv_t, "dv_t");
  TORCH_CHECK(p.spatial == (p.dq_s.data && p.dk_s.data && p.dv_s.data) &&
                  p.temporal == (p.dq_t.data && p.dk_t.data && p.dv_t.data),
              "the gradients must be given exactly for the branches computed");

  if (out.is_cpu()) {
    parallel_st_attention_bwd_cpu(p);
    return;
  }
#ifdef PYCHOP_WITH_CUDA
  bool needs_scratch = false;
  check_launch(cuda_backward_needs_scratch(p, needs_scratch));
  at::Tensor delta;  // scratch, alive until the kernels are enqueued (stream-ordered)
  if (needs_scratch) {
    delta = at::empty({p.batch, p.frames, p.heads, p.tokens}, out.options().dtype(at::kFloat));
    p.delta = delta.data_ptr<float>();
  }
  check_launch(launch_parallel_st_attention_bwd(p, reinterpret_cast<void*>(stream)));
#else
  TORCH_CHECK(false, no_cuda());
#endif
}

bool with_cuda() {
#ifdef PYCHOP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace pychop

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pychop._C: fused parallel spatial-temporal attention kernels (CPU and CUDA)";
  m.def("attention_forward", &pychop::forward,
        "Fused attention forward; writes out, lse_s, lse_t (see pychop/ops/extension_attention.py)",
        py::arg("q_s"), py::arg("k_s"), py::arg("v_s"), py::arg("q_t"), py::arg("k_t"), py::arg("v_t"),
        py::arg("out"), py::arg("out_t"), py::arg("lse_s"), py::arg("lse_t"), py::arg("scale"),
        py::arg("causal"), py::arg("window"), py::arg("stream"));
  m.def("attention_backward", &pychop::backward,
        "Fused attention backward; writes dq_s ... dv_t (see pychop/ops/extension_attention.py)",
        py::arg("dout"), py::arg("dout_t"), py::arg("q_s"), py::arg("k_s"), py::arg("v_s"), py::arg("q_t"), py::arg("k_t"),
        py::arg("v_t"), py::arg("out"), py::arg("lse_s"), py::arg("lse_t"), py::arg("dq_s"), py::arg("dk_s"),
        py::arg("dv_s"), py::arg("dq_t"), py::arg("dk_t"), py::arg("dv_t"), py::arg("scale"), py::arg("causal"),
        py::arg("window"), py::arg("grad_window"), py::arg("stream"));
  m.def("with_cuda", &pychop::with_cuda, "Whether this build has the CUDA kernels");
  m.attr("MAX_HEAD_DIM") = pychop::MAX_HEAD_DIM;  // the largest head dim the kernels take
}

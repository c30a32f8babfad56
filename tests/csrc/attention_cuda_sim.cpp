// The CUDA kernels of csrc/attention/cuda, their own source, run on the CPU (tests/csrc/cuda_sim/cuda_sim.h: fibers
// for threads, random schedules between barriers, poisoned shared memory, cp.async completing only at its wait,
// guard pages around every tensor and past the launch's dynamic shared memory), through launch.cu's entry points
// as the binding calls them: every case's forward and backward against the double-precision reference
// (attention_reference.h). Inputs are read through their strides from buffers whose every other byte is NaN, and
// outputs start as NaN, so a read past a row or an element left unwritten shows.
//
// Tolerances are tests/checks.py's rule: an output's error against float64 (relative to its largest magnitude, or
// absolute below 1) may be ERROR_FACTOR times that of the plain path in the same dtype (the reference with every
// stored intermediate rounded to the dtype) plus FLOOR[dtype]; lse, float32 in every dtype, against the plain
// path in float32.
//
// Built and run by tests/test_extension_build.py (tests/cuda_sim.py rewrites the launches, shared-memory
// declarations and inline PTX for the host compiler). Without arguments, a representative set of cases; with
// --all, a larger one (head dims 8 to 256 in every dtype and shared-memory size); --shard k/n runs cases k, k + n,
// ... of the set only. Prints one line per case and "ok"; exits 1 at the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention/cuda/attention_layout.h"
#include "attention/kernels.h"
#include "attention_reference.h"
#include "check.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_sim.h"

using namespace pychop;
using namespace pychop::double_precision;

namespace {

std::mt19937 rng(4321);

size_t element_size(ScalarKind dtype) { return dtype == ScalarKind::Float32 ? 4 : 2; }

double load(const unsigned char* p, ScalarKind dtype) {
  switch (dtype) {
    case ScalarKind::Float16: { __half h; std::memcpy(&h, p, 2); return __half2float(h); }
    case ScalarKind::BFloat16: { __nv_bfloat16 h; std::memcpy(&h, p, 2); return __bfloat162float(h); }
    default: { float f; std::memcpy(&f, p, 4); return f; }
  }
}

void store(unsigned char* p, ScalarKind dtype, float value) {
  switch (dtype) {
    case ScalarKind::Float16: { const __half h = __float2half_rn(value); std::memcpy(p, &h, 2); break; }
    case ScalarKind::BFloat16: { const __nv_bfloat16 h = __float2bfloat16_rn(value); std::memcpy(p, &h, 2); break; }
    default: std::memcpy(p, &value, 4);
  }
}

// A (B, T, S, H, D) view: slot `slot` of `slots` interleaved along a dim between S and H, rows of `row` elements
// (>= D; NaN past D), the data pointer moved by `shift` elements off 16 bytes; with heads_outer, stored as
// (B, H, S, T, row) instead (one slot): every stride of another size and order.
struct Layout {
  int slots = 1, row = 0, shift = 0;
  bool heads_outer = false;
};

struct Buffer {
  std::unique_ptr<sim::Guarded> memory;
  ScalarKind dtype;
  int B, T, S, H, D;
  Layout layout;

  Buffer(ScalarKind dtype_, int B_, int T_, int S_, int H_, int D_, Layout l)
      : dtype(dtype_), B(B_), T(T_), S(S_), H(H_), D(D_), layout(l) {
    if (layout.row < D) layout.row = D;
    const size_t bytes = (size_t(B) * T * S * layout.slots * H * layout.row + layout.shift) * element_size(dtype);
    memory = std::make_unique<sim::Guarded>(bytes, 16);
    std::memset(memory->data, 0xff, bytes);  // NaN wherever no view of this buffer lies
  }

  TensorRef view(int slot) const {
    if (layout.heads_outer) {
      const int64_t st = layout.row, ss = st * T, sh = ss * S, sb = sh * H;
      return {memory->data + layout.shift * element_size(dtype), sb, st, ss, sh};
    }
    const int64_t sh = layout.row, slot_stride = int64_t(H) * sh, ss = slot_stride * layout.slots, st = ss * S,
                  sb = st * T;
    return {memory->data + (layout.shift + slot * slot_stride) * element_size(dtype), sb, st, ss, sh};
  }
};

unsigned char* at(const TensorRef& r, ScalarKind dtype, int b, int t, int s, int h, int c) {
  return static_cast<unsigned char*>(r.data) +
         (b * r.stride_b + t * r.stride_t + s * r.stride_s + h * r.stride_h + c) * int64_t(element_size(dtype));
}

struct Case {
  std::string name;
  int B, T, S, H, D;
  ScalarKind dtype;
  bool spatial, temporal, stacked, causal;
  int window, grad_window;
  int shared_memory;  // the device's opt-in bytes per block
  Layout layout;      // of the inputs (slots = 6: views of one packed projection)
  float spread = 1;   // of q and k: scores of standard deviation spread**2 (the online softmax rescales often)
};

// tests/checks.py's rule.
constexpr double ERROR_FACTOR = 3.0;
double floor_of(ScalarKind dtype) {
  return dtype == ScalarKind::Float32 ? 1e-6 : dtype == ScalarKind::Float16 ? 1e-3 : 8e-3;
}

// x rounded to `dtype` (through float: the double rounding is far below the tolerances).
double rounded(double x, ScalarKind dtype) {
  unsigned char bytes[4];
  store(bytes, dtype, static_cast<float>(x));
  return load(bytes, dtype);
}

// Both branches' outputs, lse and gradients, every problem along its axis through double_precision::reference:
// exact (precision null), or the plain path in `precision`, float32 sums and intermediates rounded to it.
struct Branches {
  std::vector<double> o[2], lse[2], grad[2][3];  // [spatial, temporal], (B, T, S, H, D) / (B, T, H, S)
};

Branches reference_of(const Case& c, const TensorRef (&x)[6], const TensorRef& dout_s, const TensorRef& dout_t,
                      const ScalarKind* precision) {
  Branches res;
  const int B = c.B, T = c.T, S = c.S, H = c.H, D = c.D;
  const double scale = 1 / std::sqrt(double(D));
  const auto round = [&](double v) { return rounded(v, *precision); };
  for (int axis = 0; axis < 2; ++axis) {
    if (!(axis == 0 ? c.spatial : c.temporal)) continue;
    const bool spatial = axis == 0;
    const int L = spatial ? S : T, outer = spatial ? T : S;
    res.o[axis].assign(size_t(B) * T * S * H * D, 0);
    res.lse[axis].assign(size_t(B) * T * H * S, 0);
    for (auto& g : res.grad[axis]) g.assign(size_t(B) * T * S * H * D, 0);
    Branch br;
    br.rows = L;
    br.causal = !spatial && c.causal;
    br.window = spatial ? 0 : c.window;
    br.grad_window = spatial ? 0 : c.grad_window;
    for (int b = 0; b < B; ++b)
      for (int o = 0; o < outer; ++o)
        for (int h = 0; h < H; ++h) {
          Problem pr{L, D, scale, {}, {}, {}, {}};
          const TensorRef* in = x + (spatial ? 0 : 3);
          std::vector<double>* mats[] = {&pr.q, &pr.k, &pr.v, &pr.dout};
          const TensorRef* refs[] = {&in[0], &in[1], &in[2], spatial ? &dout_s : &dout_t};
          for (int m = 0; m < 4; ++m)
            for (int r = 0; r < L; ++r)
              for (int d = 0; d < D; ++d)
                mats[m]->push_back(load(at(*refs[m], c.dtype, b, spatial ? o : r, spatial ? r : o, h, d), c.dtype));
          const Result got = precision ? reference<float>(br, pr, round) : reference(br, pr);
          for (int r = 0; r < L; ++r) {
            const int t = spatial ? o : r, s = spatial ? r : o;
            const size_t row = (((size_t(b) * T + t) * S + s) * H + h) * D;
            for (int d = 0; d < D; ++d) {
              res.o[axis][row + d] = got.o[r * D + d];
              res.grad[axis][0][row + d] = got.dq[r * D + d];
              res.grad[axis][1][row + d] = got.dk[r * D + d];
              res.grad[axis][2][row + d] = got.dv[r * D + d];
            }
            res.lse[axis][((size_t(b) * T + t) * H + h) * S + s] = got.lse[r];
          }
        }
  }
  // The summed output, as one more rounded sum.
  if (c.spatial && c.temporal && !c.stacked)
    for (size_t i = 0; i < res.o[0].size(); ++i)
      res.o[0][i] = precision ? round(res.o[0][i] + res.o[1][i]) : res.o[0][i] + res.o[1][i];
  return res;
}

// Largest |got - want| over max(1, largest |want|) (tests/checks.py's relative_error); NaN counts as infinite.
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double err = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::isnan(got[i]) ? INFINITY : std::abs(got[i] - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

// A (B, T, S, H, D) view's elements in the reference's order.
std::vector<double> values(const Case& c, const TensorRef& view) {
  std::vector<double> v;
  for (int b = 0; b < c.B; ++b)
    for (int t = 0; t < c.T; ++t)
      for (int s = 0; s < c.S; ++s)
        for (int h = 0; h < c.H; ++h)
          for (int d = 0; d < c.D; ++d) v.push_back(load(at(view, c.dtype, b, t, s, h, d), c.dtype));
  return v;
}

// The kernel's error and its bound: ERROR_FACTOR times the plain path's error plus the floor.
struct Checked {
  double error = 0, bound = 0;
};

Checked check(const Case& c, const char* what, const std::vector<double>& got, const std::vector<double>& exact,
              const std::vector<double>& plain, double floor) {
  const Checked r{relative_error(got, exact), ERROR_FACTOR * relative_error(plain, exact) + floor};
  CHECK(r.error <= r.bound, "%s: %s error %.3g > bound %.3g", c.name.c_str(), what, r.error, r.bound);
  return r;
}

void fill(const TensorRef& r, const Case& c, std::normal_distribution<float>& normal, float spread = 1) {
  for (int b = 0; b < c.B; ++b)
    for (int t = 0; t < c.T; ++t)
      for (int s = 0; s < c.S; ++s)
        for (int h = 0; h < c.H; ++h)
          for (int d = 0; d < c.D; ++d) store(at(r, c.dtype, b, t, s, h, d), c.dtype, spread * normal(rng));
}

void expect_launched(const char* error, const char* what, const Case& c) {
  CHECK(error == nullptr, "%s: %s: %s", c.name.c_str(), what, error);
  CHECK(sim::device.last_error == 0, "%s: %s left an error for the next launch", c.name.c_str(), what);
}

// Which kernels the case takes (attention_layout.h's choice for its shared memory), for the case's line.
std::string plan_of(const Case& c) {
  std::string plan;
  const size_t elem = element_size(c.dtype), limit = size_t(c.shared_memory);
  const int Dp = cuda::padded_head_dim(c.D);
  for (int axis = 0; axis < 2; ++axis) {
    if (!(axis == 0 ? c.spatial : c.temporal)) continue;
    const int rows = axis == 0 ? c.S : c.T;
    const cuda::BackwardPlan bwd = cuda::backward_plan(elem, rows, Dp, limit);
    char text[96];
    std::snprintf(text, sizeof(text), " %c: fwd %d, bwd %d%s%s", axis == 0 ? 's' : 't',
                  cuda::forward_block(elem, rows, Dp, limit), bwd.block, rows <= bwd.block ? " one pass" : " + dq",
                  bwd.splits > 1 ? (bwd.splits == 2 ? " split 2" : " split 4") : "");
    plan += text;
  }
  return plan;
}

void run(const Case& c) {
  sim::device.optin_shared_memory = c.shared_memory;
  sim::device.max_dynamic_shared.clear();
  std::normal_distribution<float> normal;
  const int B = c.B, T = c.T, S = c.S, H = c.H, D = c.D;
  const ScalarKind dt = c.dtype;
  std::vector<std::unique_ptr<Buffer>> buffers;
  const auto buffer = [&](int slots, Layout layout) -> Buffer& {
    layout.slots = slots;
    buffers.push_back(std::make_unique<Buffer>(dt, B, T, S, H, D, layout));
    return *buffers.back();
  };
  // Inputs: six views of one packed projection, or six tensors of the case's layout.
  TensorRef x[6];
  if (c.layout.slots == 6) {
    Buffer& packed = buffer(6, c.layout);
    for (int i = 0; i < 6; ++i) x[i] = packed.view(i);
  } else {
    for (TensorRef& r : x) r = buffer(1, c.layout).view(0);
  }
  for (int i = 0; i < 6; ++i) fill(x[i], c, normal, i % 3 == 2 ? 1.f : c.spread);  // q, k spread; v not
  // Outputs: (B, T, S, 2, H, D) when stacked, else (B, T, S, H, D); NaN until written.
  Buffer& out = buffer(c.stacked ? 2 : 1, Layout{});
  Buffer& dout = buffer(c.stacked ? 2 : 1, Layout{});
  fill(dout.view(0), c, normal);
  if (c.stacked) fill(dout.view(1), c, normal);
  const size_t stats = size_t(B) * T * H * S;
  sim::Guarded lse_s(sizeof(float) * stats, 16), lse_t(sizeof(float) * stats, 16);
  std::memset(lse_s.data, 0xff, sizeof(float) * stats);
  std::memset(lse_t.data, 0xff, sizeof(float) * stats);

  AttentionParams p;
  p.batch = B, p.frames = T, p.tokens = S, p.heads = H, p.head_dim = D;
  p.dtype = dt;
  p.scale = float(1 / std::sqrt(double(D)));
  p.spatial = c.spatial, p.temporal = c.temporal, p.stacked = c.stacked;
  p.causal = c.causal || c.window > 0;
  p.window = c.window;
  if (c.spatial) p.q_s = x[0], p.k_s = x[1], p.v_s = x[2], p.lse_s = reinterpret_cast<float*>(lse_s.data);
  if (c.temporal) p.q_t = x[3], p.k_t = x[4], p.v_t = x[5], p.lse_t = reinterpret_cast<float*>(lse_t.data);
  p.out = out.view(0);
  p.out_t = c.stacked ? out.view(1) : p.out;
  const int64_t blocks_before = sim::device.blocks_run;
  expect_launched(launch_parallel_st_attention_fwd(p, nullptr), "forward", c);

  const TensorRef dout_t = c.stacked ? dout.view(1) : dout.view(0);
  const ScalarKind float32 = ScalarKind::Float32;
  const Branches exact = reference_of(c, x, dout.view(0), dout_t, nullptr);
  const Branches plain = reference_of(c, x, dout.view(0), dout_t, &dt);
  const Branches plain32 = dt == float32 ? plain : reference_of(c, x, dout.view(0), dout_t, &float32);
  const double floor = floor_of(dt);
  double worst = 0, bound = INFINITY;  // the case's largest error over its bound, for the case's line
  const auto note = [&](Checked r) {
    if (r.error / r.bound >= worst / bound) worst = r.error, bound = r.bound;
  };
  const int first_axis = c.spatial ? 0 : 1;
  note(check(c, c.stacked ? "o_s" : "out", values(c, out.view(0)), exact.o[first_axis], plain.o[first_axis], floor));
  if (c.stacked) note(check(c, "o_t", values(c, out.view(1)), exact.o[1], plain.o[1], floor));
  const float* lse[2] = {p.lse_s, p.lse_t};
  for (int axis = 0; axis < 2; ++axis)
    if (axis == 0 ? c.spatial : c.temporal) {
      const std::vector<double> got(lse[axis], lse[axis] + stats);
      note(check(c, axis == 0 ? "lse_s" : "lse_t", got, exact.lse[axis], plain32.lse[axis], floor_of(float32)));
    }

  // Backward, as the binding calls it: out is o_s when stacked, the gradients contiguous, delta scratch if asked.
  p.out_t = p.out;
  p.dout = dout.view(0);
  p.dout_t = dout_t;
  p.grad_window = c.grad_window;
  TensorRef* grads[2][3] = {{&p.dq_s, &p.dk_s, &p.dv_s}, {&p.dq_t, &p.dk_t, &p.dv_t}};
  for (int axis = 0; axis < 2; ++axis)
    if (axis == 0 ? c.spatial : c.temporal)
      for (TensorRef* g : grads[axis]) *g = buffer(1, Layout{}).view(0);
  bool needs_scratch = false;
  expect_launched(cuda_backward_needs_scratch(p, needs_scratch), "backward plan", c);
  std::unique_ptr<sim::Guarded> delta;
  if (needs_scratch) {
    delta = std::make_unique<sim::Guarded>(sizeof(float) * stats, 16);
    std::memset(delta->data, 0xff, sizeof(float) * stats);
    p.delta = reinterpret_cast<float*>(delta->data);
  }
  expect_launched(launch_parallel_st_attention_bwd(p, nullptr), "backward", c);
  const char* names[2][3] = {{"dq_s", "dk_s", "dv_s"}, {"dq_t", "dk_t", "dv_t"}};
  for (int axis = 0; axis < 2; ++axis)
    if (axis == 0 ? c.spatial : c.temporal)
      for (int g = 0; g < 3; ++g)
        note(check(c, names[axis][g], values(c, *grads[axis][g]), exact.grad[axis][g], plain.grad[axis][g], floor));
  std::printf("%-40s %5lld blocks, worst error %.2g of bound %.2g;%s\n", c.name.c_str(),
              (long long)(sim::device.blocks_run - blocks_before), worst, bound, plan_of(c).c_str());
}

// A failed runtime call is reported by name and cleared from the error slot; no block size fitting (the device's
// shared memory, or less by PYCHOP_CUDA_SHARED_MEMORY_LIMIT) is an error, and nothing runs.
void check_errors() {
  const ScalarKind dtype = ScalarKind::BFloat16;
  sim::device.optin_shared_memory = 232448;
  AttentionParams p;
  p.batch = 1, p.frames = 2, p.tokens = 5, p.heads = 1, p.head_dim = 16, p.dtype = dtype, p.spatial = true;
  const Buffer tensor(dtype, 1, 2, 5, 1, 16, Layout{});
  p.q_s = p.k_s = p.v_s = p.out = p.out_t = tensor.view(0);
  sim::Guarded lse(sizeof(float) * 10, 16);
  p.lse_s = reinterpret_cast<float*>(lse.data);
  sim::device.fail_set_attribute = 1;
  const char* error = launch_parallel_st_attention_fwd(p, nullptr);
  CHECK(error != nullptr && std::string(error).find("cudaFuncSetAttribute") != std::string::npos,
        "a failed cudaFuncSetAttribute reported by name: %s", error ? error : "(none)");
  CHECK(sim::device.last_error == 0, "the failed call cleared from the error slot");
  const int64_t blocks = sim::device.blocks_run;
  for (const bool by_environment : {false, true}) {  // the device's limit, or PYCHOP_CUDA_SHARED_MEMORY_LIMIT's
    sim::device.optin_shared_memory = by_environment ? 232448 : 4096;
    if (by_environment) setenv("PYCHOP_CUDA_SHARED_MEMORY_LIMIT", "4096", 1);
    error = launch_parallel_st_attention_fwd(p, nullptr);
    unsetenv("PYCHOP_CUDA_SHARED_MEMORY_LIMIT");
    CHECK(error != nullptr && std::string(error).find("no block size fits") != std::string::npos &&
          sim::device.blocks_run == blocks, "too little shared memory (%s): %s",
          by_environment ? "PYCHOP_CUDA_SHARED_MEMORY_LIMIT" : "the device's", error ? error : "(none)");
  }
}

// A stand-in conversion (half or bfloat16, `largest` the bits of its largest finite value): every finite value
// converts to float and back unchanged, and a float halfway between two neighbours rounds to the even one (just
// above or below it, to the nearer).
template <typename Half, typename ToFloat, typename FromFloat>
void check_conversion(const char* name, uint16_t largest, ToFloat to_float, FromFloat from_float) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = to_float(Half{uint16_t(bits)});
    if (!std::isfinite(f)) continue;
    CHECK(from_float(f).bits == bits, "%s %04x round trip", name, bits);
    if ((bits & 0x7fff) >= largest) continue;  // the next one up is infinite
    const float next = to_float(Half{uint16_t(bits + 1)});
    const float mid = f + (next - f) / 2;  // exact: a 16-bit format's neighbours differ in its last bit
    CHECK(from_float(mid).bits == (bits & 1 ? bits + 1 : bits), "%s %04x: the midpoint to the even one", name, bits);
    CHECK(from_float(std::nextafter(mid, f)).bits == bits, "%s %04x: below the midpoint", name, bits);
    CHECK(from_float(std::nextafter(mid, next)).bits == bits + 1, "%s %04x: above the midpoint", name, bits);
  }
}

constexpr int KiB99 = 101376, KiB163 = 166912, KiB227 = 232448;  // sm_86/89/120, sm_80, sm_90/100
using SK = ScalarKind;

// The representative set: every dtype, kernel path (forward blocks 16/32/64; backward in one pass, or query
// kernel with delta from the branch's own output or from rowsum(P dP); head-dim splits) and mask.
std::vector<Case> quick_cases() {
  return {
      // S = 70: two key blocks of 64 (query kernel, delta as rowsum(P dP) for the summed output); T = 5 in one pass.
      {"summed bf16 S70 T5 D40 causal w2 g1", 1, 5, 70, 2, 40, SK::BFloat16, true, true, false, true, 2, 1, KiB227, {}},
      {"summed f16 S70 T5 D40 causal w2 g1", 1, 5, 70, 2, 40, SK::Float16, true, true, false, true, 2, 1, KiB227, {}},
      {"summed f32 S70 T5 D40 causal w2 g1", 1, 5, 70, 2, 40, SK::Float32, true, true, false, true, 2, 1, KiB227, {}},
      // T = 70: the temporal query kernel; summed, stacked and alone (delta from o_t), window skipping key blocks.
      {"summed bf16 S3 T70 D16 causal g5", 1, 70, 3, 1, 16, SK::BFloat16, true, true, false, true, 0, 5, KiB227, {}},
      {"stacked bf16 S3 T70 D16 w40 g20", 1, 70, 3, 1, 16, SK::BFloat16, true, true, true, true, 40, 20, KiB227, {}},
      {"temporal f32 T70 D16 w40 g20", 1, 70, 2, 1, 16, SK::Float32, false, true, false, true, 40, 20, KiB227, {}},
      {"temporal f32 T70 D16 full g3", 1, 70, 1, 2, 16, SK::Float32, false, true, false, false, 0, 3, KiB227, {}},
      // Row 64 attends key 63: the key kernel's block of keys 0..63 must take the query block at 64 too.
      {"temporal bf16 T65 D24 w2", 1, 65, 2, 1, 24, SK::BFloat16, false, true, false, true, 2, 0, KiB227, {}},
      {"temporal f16 T67 D72 w3 g2", 1, 67, 2, 1, 72, SK::Float16, false, true, false, true, 3, 2, KiB227, {}},
      // Spatial alone, S = 130: three blocks, delta from o_s; D = 10: 20-byte rows, element by element.
      {"spatial f16 S130 D10", 1, 2, 130, 1, 10, SK::Float16, true, false, false, false, 0, 0, KiB227, {}},
      {"spatial f32 S33 D24 (one block of 64)", 2, 2, 33, 2, 24, SK::Float32, true, false, false, false, 0, 0, KiB227, {}},
      {"spatial bf16 S45 D72", 1, 2, 45, 1, 72, SK::BFloat16, true, false, false, false, 0, 0, KiB227, {}},
      // T = 17 and 33: one pass in blocks of 32 and 64 rows.
      {"summed f32 S5 T17 D40 causal g4", 1, 17, 5, 1, 40, SK::Float32, true, true, false, true, 0, 4, KiB227, {}},
      {"summed bf16 S5 T33 D40 g3", 1, 33, 5, 1, 40, SK::BFloat16, true, true, false, false, 0, 3, KiB227, {}},
      // Packed projection views, NaN-padded rows, a pointer off 16 bytes.
      {"stacked bf16 packed S19 T3 D40 causal g2", 1, 3, 19, 2, 40, SK::BFloat16, true, true, true, true, 0, 2, KiB227,
       {6, 0, 0}},
      {"summed bf16 packed S70 T3 D24 rows of 64", 1, 3, 70, 2, 24, SK::BFloat16, true, true, false, false, 0, 0,
       KiB227, {6, 64, 0}},
      {"summed f32 rows of 64 D20 causal g1", 1, 3, 7, 2, 20, SK::Float32, true, true, false, true, 0, 1, KiB227,
       {1, 64, 0}},
      {"summed f16 (B, H, S, T) layout S7 T17 D40", 2, 17, 7, 2, 40, SK::Float16, true, true, false, true, 0, 3,
       KiB227, {1, 0, 0, true}},
      {"summed bf16 off 16 bytes S70 T3 D24", 1, 3, 70, 1, 24, SK::BFloat16, true, true, false, true, 0, 2, KiB227,
       {1, 0, 1}},
      // Scores of standard deviation 16: the running maximum moves by far from one key block to the next.
      {"spread f32 S130 T3 D16 stacked", 1, 3, 130, 1, 16, SK::Float32, true, true, true, true, 0, 3, KiB227, {}, 4},
      {"spread bf16 S2 T130 D16 w70 g3", 1, 130, 2, 1, 16, SK::BFloat16, true, true, false, true, 70, 3, KiB227, {}, 4},
      {"single token and frame", 2, 1, 1, 2, 40, SK::BFloat16, true, true, false, true, 0, 0, KiB227, {}},
      // 99 KiB: float32 D = 208 and 256 (key kernel split over head-dim columns), 16-bit D = 160.
      {"99KiB f32 D208 S7 T3 causal g2", 1, 3, 7, 1, 208, SK::Float32, true, true, false, true, 0, 2, KiB99, {}},
      {"99KiB f32 D256 S70 T2 causal g2", 1, 2, 70, 1, 256, SK::Float32, true, true, false, true, 0, 2, KiB99, {}},
      {"99KiB f32 D256 S3 T70 causal g2", 1, 70, 3, 1, 256, SK::Float32, true, true, false, true, 0, 2, KiB99, {}},
      {"99KiB bf16 D160 S40 T3 causal g2", 1, 3, 40, 1, 160, SK::BFloat16, true, true, false, true, 0, 2, KiB99, {}},
      {"99KiB f16 D160 S3 T37 w5 g2 stacked", 1, 37, 3, 1, 160, SK::Float16, true, true, true, true, 5, 2, KiB99, {}},
      // 163 KiB (sm_80): bf16 D = 256.
      {"163KiB bf16 D256 S70 T2 stacked", 1, 2, 70, 1, 256, SK::BFloat16, true, true, true, true, 0, 1, KiB163, {}},
  };
}

// The larger set: head dims 8 to 256 in every dtype and shared-memory size, odd row counts across one, two and
// three blocks, the masks in turn.
std::vector<Case> all_cases() {
  std::vector<Case> cases = quick_cases();
  const SK dtypes[] = {SK::Float32, SK::Float16, SK::BFloat16};
  const char* dtype_names[] = {"f32", "f16", "bf16"};
  const int memories[] = {KiB99, KiB163, KiB227};
  const char* memory_names[] = {"99KiB", "163KiB", "227KiB"};
  const int head_dims[] = {8, 24, 40, 56, 72, 88, 104, 120, 136, 160, 200, 208, 232, 256};
  const int rows[][2] = {{1, 17}, {31, 3}, {65, 5}, {5, 65}, {17, 33}, {130, 2}, {2, 130}};  // S, T
  const int masks[][3] = {{0, 0, 0}, {1, 0, 0}, {1, 1, 0}, {1, 2, 1}, {1, 3, 2}, {1, 0, 1}, {0, 0, 2}};
  int n = 0;
  for (int d = 0; d < 3; ++d)
    for (int m = 0; m < 3; ++m)
      for (const int D : head_dims) {
        const int* r = rows[n % 7];
        const int* mask = masks[n / 7 % 7];
        const bool stacked = n % 3 == 1;
        char name[96];
        std::snprintf(name, sizeof(name), "%s %s D%d S%d T%d c%d w%d g%d%s", memory_names[m], dtype_names[d], D,
                      r[0], r[1], mask[0], mask[1], mask[2], stacked ? " stacked" : "");
        cases.push_back({name, 1, r[1], r[0], 1, D, dtypes[d], true, true, stacked, mask[0] != 0, mask[1], mask[2],
                         memories[m], {}});
        ++n;
      }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGSEGV, sim::on_segfault);
  signal(SIGBUS, sim::on_segfault);
  check_conversion<__half>("half", 0x7bff, __half2float, __float2half_rn);
  check_conversion<__nv_bfloat16>("bfloat16", 0x7f7f, __bfloat162float, __float2bfloat16_rn);
  bool all = false;
  int shard = 0, shards = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool sharded = arg == "--shard" && i + 1 < argc && std::sscanf(argv[++i], "%d/%d", &shard, &shards) == 2;
    if (arg == "--all") {
      all = true;
    } else if (!sharded || shard < 0 || shard >= shards) {
      std::printf("usage: %s [--all] [--shard k/n]\n", argv[0]);
      return 2;
    }
  }
  const std::vector<Case> cases = all ? all_cases() : quick_cases();
  for (size_t i = shard; i < cases.size(); i += shards) run(cases[i]);
  check_errors();
  std::printf("ok\n");
}

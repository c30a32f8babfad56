// CPU stand-in for the WMMA API (nvcuda::wmma, m16n16k16, float accumulators) that block_gemm.cuh uses (see
// cuda_sim.h). Checks what the real API requires of its operands: 256-bit aligned pointers, leading dimensions a
// multiple of 16 bytes' elements, both the same in every lane. Lane 0 of the warp does the work once all 32 lanes
// have arrived.
#pragma once

#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_sim.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the stand-in knows m16n16k16 only");
  float x[256];  // element (r, c) at x[r * 16 + c]
};

inline float value(float x) { return x; }
inline float value(__half x) { return __half2float(x); }
inline float value(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
void check_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32) ::sim::fail("WMMA pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(T))) ::sim::fail("WMMA leading dimension not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators load with a layout_t");
  check_operand(p, ldm);
  if (!::sim::warp_leader(p, ldm)) return;
  const bool col = std::is_same<Layout, col_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = value(col ? p[r + c * ldm] : p[r * ldm + c]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  check_operand(p, ldm);
  if (!::sim::warp_leader(p, ldm)) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = l == mem_col_major ? p[r + c * ldm] : p[r * ldm + c];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_operand(p, ldm);
  if (!::sim::warp_leader(p, ldm)) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_col_major ? p[r + c * ldm] : p[r * ldm + c]) = f.x[r * 16 + c];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& x : f.x) x = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (threadIdx.x % 32) return;  // lane 0 holds the warp's fragments
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) sum += a.x[m * 16 + k] * b.x[k * 16 + n];
      out[m * 16 + n] = sum;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda

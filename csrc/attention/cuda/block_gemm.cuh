// Block-wide matrix products on shared memory: C (fp32) = or += A * B, tiled 16 x 16 over the warps of the
// block. Half and bfloat16 operands use tensor cores (WMMA m16n16k16, fp32 accumulation); float operands a
// SIMT loop with the same interface. Shapes are multiples of 16; leading dimensions are in elements (a
// multiple of 8 for 16-bit operands and of 4 for C) and tile origins 32-byte aligned.
#pragma once

#include <mma.h>

#include <type_traits>

#include "attention/cuda/common.cuh"

namespace pychop {
namespace cuda {

// Operand layouts: A is M x K, stored row-major (A[m * lda + k]) or, with TRANS_A, as its transpose
// (A[k * lda + m]). B is K x N, stored row-major (B[k * ldb + n]) or, with TRANS_B, as its transpose
// (B[n * ldb + k]). The caller synchronises the block before and after.
template <typename T, bool TRANS_A, bool TRANS_B, int WARPS>
struct BlockGemm {
  static __device__ __forceinline__ void run(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int M,
                                             int N, int K, bool accumulate) {
    using namespace nvcuda;
    using LayoutA = typename std::conditional<TRANS_A, wmma::col_major, wmma::row_major>::type;
    using LayoutB = typename std::conditional<TRANS_B, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += WARPS) {
      const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate)
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(c, 0.f);
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
        wmma::load_matrix_sync(a, TRANS_A ? A + k0 * lda + m0 : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, TRANS_B ? B + n0 * ldb + k0 : B + k0 * ldb + n0, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  }
};

template <bool TRANS_A, bool TRANS_B, int WARPS>
struct BlockGemm<float, TRANS_A, TRANS_B, WARPS> {
  static __device__ __forceinline__ void run(float* C, int ldc, const float* A, int lda, const float* B, int ldb,
                                             int M, int N, int K, bool accumulate) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += WARPS) {
      const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16;
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // 256 elements of the tile, 8 per lane; a lane's column is fixed
        const int m = m0 + i * 2 + lane / 16, n = n0 + lane % 16;
        float sum = accumulate ? C[m * ldc + n] : 0.f;
        for (int k = 0; k < K; ++k)
          sum += (TRANS_A ? A[k * lda + m] : A[m * lda + k]) * (TRANS_B ? B[n * ldb + k] : B[k * ldb + n]);
        C[m * ldc + n] = sum;
      }
    }
  }
};

}  // namespace cuda
}  // namespace pychop

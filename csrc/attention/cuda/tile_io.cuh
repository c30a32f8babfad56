// Moving rows of one attention problem between global memory and shared-memory tiles, in 16-byte chunks:
// cp.async (sm_80+, no register staging, every chunk of a tile in flight at once) or 16-byte stores where the
// host found the rows aligned (AxisTensor::aligned), element by element otherwise and for a chunk that straddles
// the head dim. All threads of the block take part; the caller synchronises.
#pragma once

#include "attention/cuda/branch.h"
#include "attention/cuda/common.cuh"

namespace pychop {
namespace cuda {

// Elements per 16-byte chunk.
template <typename T>
__host__ __device__ constexpr int chunk_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

// 16 bytes as elements or as one vector.
template <typename T>
union Chunk {
  uint4 bits;
  T elems[chunk_elems<T>()];
  __device__ Chunk() {}
};

__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(src));
#else
  *static_cast<uint4*>(dst) = __ldg(static_cast<const uint4*>(src));
#endif
}

// Waits for this thread's copy16_async copies (the caller then synchronises the block).
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// Rows [row0, row0 + ROWS) of problem (b, x, h) of `x` into `tile` (ROWS x cols, leading dimension ld, both
// multiples of 16 bytes), zero in rows >= rows and columns >= D. Call wait_async_copies before the barrier.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* tile, int ld, const AxisTensor& x, int b, int xi, int h, int row0,
                                          int rows, int cols, int D) {
  constexpr int N = chunk_elems<T>();
  const int chunks = cols / N;
  const T* base = static_cast<const T*>(x.data) + x.row_offset(b, xi, h, 0);
  for (int i = threadIdx.x; i < ROWS * chunks; i += THREADS) {
    const int r = i / chunks, c0 = i % chunks * N;
    T* dst = tile + r * ld + c0;
    const T* src = base + (row0 + r) * x.srow + c0;
    if (row0 + r >= rows || c0 >= D) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    } else if (x.aligned && c0 + N <= D) {
      copy16_async(dst, src);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) dst[e] = c0 + e < D ? src[e] : from_float<T>(0.f);
    }
  }
}

// Writes value(r, c) (float) to rows [row0, row0 + ROWS) of problem (b, x, h) of `y`, columns [c0, c1) (c0 a
// multiple of 16 bytes' elements), rows < rows only; with `add`, adds to what is there (in float, rounded once).
template <typename T, int ROWS, int THREADS, typename Value>
__device__ __forceinline__ void store_rows(const AxisTensor& y, int b, int xi, int h, int row0, int rows, int c0,
                                           int c1, bool add, Value value) {
  constexpr int N = chunk_elems<T>();
  const int chunks = (c1 - c0 + N - 1) / N;
  T* base = static_cast<T*>(y.data) + y.row_offset(b, xi, h, 0);
  for (int i = threadIdx.x; i < ROWS * chunks; i += THREADS) {
    const int r = i / chunks, c = c0 + i % chunks * N;
    if (row0 + r >= rows) continue;
    T* dst = base + (row0 + r) * y.srow + c;
    if (y.aligned && c + N <= c1) {
      Chunk<T> chunk;
      chunk.bits = add ? *reinterpret_cast<const uint4*>(dst) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int e = 0; e < N; ++e) chunk.elems[e] = from_float<T>(value(r, c + e) + to_float(chunk.elems[e]));
      *reinterpret_cast<uint4*>(dst) = chunk.bits;
    } else {
      for (int e = 0; e < N && c + e < c1; ++e)
        dst[e] = from_float<T>(value(r, c + e) + (add ? to_float(dst[e]) : 0.f));
    }
  }
}

}  // namespace cuda
}  // namespace pychop

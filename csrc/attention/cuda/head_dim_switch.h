// The block-size choice of the CUDA kernels, host side, and the one switch turning it into the compile-time
// BLOCK of a kernel's template (in the manner of FlashAttention's HEADDIM_SWITCH). Plain C++:
// tests/test_extension_build.py runs it on the host. Adding a block size is adding a case to both functions.
#pragma once

#include <type_traits>

namespace pychop {

// Query and key blocks of BLOCK x BLOCK rows for an attention over `rows` rows (S tokens or T frames): the
// largest of 64, 32, 16 for which fits(block) (the kernel's shared memory fits the device), except that a
// block of more than twice `rows` is passed over for a smaller one that fits (T = 16 frames take 16-row
// blocks, not 64 mostly empty ones). 0 when even 16 does not fit.
template <typename Fits>
int choose_block(int rows, Fits&& fits) {
  if (fits(64) && rows > 32) return 64;
  if (fits(32) && rows > 16) return 32;
  if (fits(16)) return 16;
  return 0;
}

// fn(std::integral_constant<int, block>{}) for a block that choose_block returned; for 0 (none fits), the error.
template <typename Fn>
const char* dispatch_block(int block, Fn&& fn) {
  switch (block) {
    case 64: return fn(std::integral_constant<int, 64>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    default: return "pychop: no block size fits this head dim in the device's shared memory";
  }
}

}  // namespace pychop

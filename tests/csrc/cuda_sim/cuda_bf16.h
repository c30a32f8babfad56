// CPU stand-in for CUDA's bfloat16 type (see cuda_sim.h): 16 bits, conversions rounding to nearest even.
#pragma once

#include <cstdint>

#include "cuda_sim.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) { return ::sim::float_of_bits(uint32_t(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = ::sim::bits_of_float(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {uint16_t((x >> 16) | 0x40)};
  return {uint16_t((x + 0x7fffu + ((x >> 16) & 1)) >> 16)};
}

// CPU stand-in for CUDA's half type (see cuda_sim.h): 16 bits, conversions rounding to nearest even.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_sim.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000) << 16, exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  if (exponent == 0) {
    const float value = std::ldexp(float(mantissa), -24);
    return sign ? -value : value;
  }
  return ::sim::float_of_bits(exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                             : sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = ::sim::bits_of_float(f);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return {uint16_t(sign | (magnitude > 0x7f800000u ? 0x7e00 : 0x7c00))};
  if (magnitude >= 0x477ff000u) return {uint16_t(sign | 0x7c00)};  // 65520 and up round to infinity
  if (magnitude < 0x38800000u) {                                   // below 2**-14: a subnormal half
    return {uint16_t(sign | uint16_t(std::nearbyint(::sim::float_of_bits(magnitude) * 16777216.f)))};
  }
  uint32_t h = ((((magnitude >> 23) - 127 + 15)) << 10) | ((magnitude & 0x7fffff) >> 13);
  const uint32_t rest = magnitude & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return {uint16_t(sign | h)};
}

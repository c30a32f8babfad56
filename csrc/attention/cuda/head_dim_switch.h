// The head-dim dispatch of the CUDA kernels: each decision is one switch, here, turning a runtime size into the
// compile-time constants of a kernel's template (in the manner of FlashAttention's HEADDIM_SWITCH). Each macro
// is an expression: it runs its last argument, a lambda returning const char* (a launch error or nullptr),
// with the constants in scope, and yields what the lambda returns. Adding a bucket is adding a line here.
#pragma once

#include "attention/params.h"

// Temporal branch: a group of LANES lanes (a power of two <= 32) owns one token-head, each lane PER_LANE
// elements of the head dim, LANES * PER_LANE >= HEAD_DIM, so that few lanes idle (D = 40: 16 x 4).
#define PYCHOP_TEMPORAL_LANES_SWITCH(HEAD_DIM, ...)                                                   \
  [&]() -> const char* {                                                                              \
    if ((HEAD_DIM) <= 16) {                                                                           \
      constexpr static int LANES = 4, PER_LANE = 4;                                                   \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    if ((HEAD_DIM) <= 32) {                                                                           \
      constexpr static int LANES = 8, PER_LANE = 4;                                                   \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    if ((HEAD_DIM) <= 64) {                                                                           \
      constexpr static int LANES = 16, PER_LANE = 4;                                                  \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    if ((HEAD_DIM) <= 128) {                                                                          \
      constexpr static int LANES = 32, PER_LANE = 4;                                                  \
      return __VA_ARGS__();                                                                           \
    }                                                                                                 \
    constexpr static int LANES = 32, PER_LANE = 8; /* every head dim the binding lets through */      \
    static_assert(LANES * PER_LANE >= ::pychop::MAX_HEAD_DIM, "the last bucket must hold MAX_HEAD_DIM"); \
    return __VA_ARGS__();                                                                             \
  }()

// Spatial branch, forward and backward alike: the query and key blocks (BLOCK x BLOCK) of the largest block
// size whose shared memory, SMEM_BYTES(block) (a callable), fits in LIMIT bytes; NONE_FITS (an error string)
// when even 16 does not.
#define PYCHOP_SPATIAL_BLOCK_SWITCH(SMEM_BYTES, LIMIT, NONE_FITS, ...) \
  [&]() -> const char* {                                               \
    if ((SMEM_BYTES)(64) <= (LIMIT)) {                                 \
      constexpr static int BLOCK = 64;                                 \
      return __VA_ARGS__();                                            \
    }                                                                  \
    if ((SMEM_BYTES)(32) <= (LIMIT)) {                                 \
      constexpr static int BLOCK = 32;                                 \
      return __VA_ARGS__();                                            \
    }                                                                  \
    if ((SMEM_BYTES)(16) <= (LIMIT)) {                                 \
      constexpr static int BLOCK = 16;                                 \
      return __VA_ARGS__();                                            \
    }                                                                  \
    return NONE_FITS;                                                  \
  }()

// CHECK(cond, printf-format, ...): the host programs' assertion (tests/csrc/*.cpp): prints the line, the condition
// and the message, exits 1.
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      std::printf("FAIL line %d: %s: ", __LINE__, #cond); \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
      std::exit(1);                                       \
    }                                                     \
  } while (0)

// The emulated GPU: IEEE binary16 storage and its exact widening to float (see cuda_runtime.h).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu, out;
  if (exp == 0x1F) {
    out = sign | 0x7F800000u | (man << 13);  // Inf, NaN (payload kept)
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    out = sign;  // signed zero
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400u));
    out = sign | ((112 - e) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

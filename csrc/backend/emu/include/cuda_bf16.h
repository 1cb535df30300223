// The emulated GPU: bfloat16 storage and its exact widening to float (see cuda_runtime.h).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

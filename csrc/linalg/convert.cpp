#include "linalg/convert.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/parallel.h"

namespace pysafe {

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// F8_E4M3 ("fn" variant used by safetensors/torch): bias 7, no infinities, S.1111.111 is NaN.
float f8e4m3_to_float(uint8_t v) {
  float sign = (v & 0x80) ? -1.0f : 1.0f;
  int exp = (v >> 3) & 0xF;
  int man = v & 0x7;
  if (exp == 0xF && man == 0x7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^-6
  return sign * std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
}

// F8_E5M2: the top byte of an IEEE half.
float f8e5m2_to_float(uint8_t v) { return half_to_float(static_cast<uint16_t>(v) << 8); }

// F8_E8M0 (OCP MX scale): an unsigned exponent, bias 127, 2^(v-127); 0xFF is NaN; no zero.
float f8e8m0_to_float(uint8_t v) {
  if (v == 0xFF) return std::nanf("");
  return std::ldexp(1.0f, static_cast<int>(v) - 127);  // v = 0 gives 2^-127, a float subnormal (exact)
}

// The "fnuz" F8 variants: no infinities, no negative zero; the pattern 0x80 is the only NaN.
// F8_E4M3FNUZ: bias 8, 3 mantissa bits.
float f8e4m3fnuz_to_float(uint8_t v) {
  if (v == 0x80) return std::nanf("");
  float sign = (v & 0x80) ? -1.0f : 1.0f;
  int exp = (v >> 3) & 0xF, man = v & 0x7;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -10);  // man/8 * 2^(1-8)
  return sign * std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 8);
}

// F8_E5M2FNUZ: bias 16, 2 mantissa bits.
float f8e5m2fnuz_to_float(uint8_t v) {
  if (v == 0x80) return std::nanf("");
  float sign = (v & 0x80) ? -1.0f : 1.0f;
  int exp = (v >> 2) & 0x1F, man = v & 0x3;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -17);  // man/4 * 2^(1-16)
  return sign * std::ldexp(1.0f + static_cast<float>(man) / 4.0f, exp - 16);
}

// F4 (OCP MX FP4 E2M1) of one nibble: bias 1, 1 mantissa bit, no NaN or infinity.
float f4e2m1_to_float(uint8_t nibble) {
  float sign = (nibble & 0x8) ? -1.0f : 1.0f;
  int exp = (nibble >> 1) & 0x3, man = nibble & 0x1;
  if (exp == 0) return sign * 0.5f * static_cast<float>(man);
  return sign * std::ldexp(1.0f + 0.5f * static_cast<float>(man), exp - 1);
}

bool dtype_convertible(DType d) { return d != DType::C64 && d != DType::F6_E2M3 && d != DType::F6_E3M2; }

namespace {

struct Tables {
  float e4m3[256];
  float e5m2[256];
  float e8m0[256];
  float e4m3fnuz[256];
  float e5m2fnuz[256];
  float f4[16];
  Tables() {
    for (int i = 0; i < 256; ++i) {
      auto v = static_cast<uint8_t>(i);
      e4m3[i] = f8e4m3_to_float(v);
      e5m2[i] = f8e5m2_to_float(v);
      e8m0[i] = f8e8m0_to_float(v);
      e4m3fnuz[i] = f8e4m3fnuz_to_float(v);
      e5m2fnuz[i] = f8e5m2fnuz_to_float(v);
    }
    for (int i = 0; i < 16; ++i) f4[i] = f4e2m1_to_float(static_cast<uint8_t>(i));
  }
  /// The table of a one-byte float format (F8_*).
  const float* byte_table(DType d) const {
    switch (d) {
      case DType::F8_E4M3: return e4m3;
      case DType::F8_E5M2: return e5m2;
      case DType::F8_E8M0: return e8m0;
      case DType::F8_E4M3FNUZ: return e4m3fnuz;
      case DType::F8_E5M2FNUZ: return e5m2fnuz;
      default: PYSAFE_ASSERT(false); return nullptr;
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

template <typename S>
S load(const uint8_t* p, size_t i) {
  S v;
  std::memcpy(&v, p + i * sizeof(S), sizeof(S));
  return v;
}

// Convert a contiguous block; returns non-finite count (only floating dtypes can have any).
template <typename T>
uint64_t convert_block(const uint8_t* src, DType dt, size_t n, T* dst) {
  uint64_t bad = 0;
  switch (dt) {
    case DType::F64:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<double>(src, i));
      break;
    case DType::F32:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<float>(src, i));
      break;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) {
        uint32_t bits = static_cast<uint32_t>(load<uint16_t>(src, i)) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        dst[i] = static_cast<T>(f);
      }
      break;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_to_float(load<uint16_t>(src, i)));
      break;
    case DType::F8_E4M3:
    case DType::F8_E5M2:
    case DType::F8_E8M0:
    case DType::F8_E4M3FNUZ:
    case DType::F8_E5M2FNUZ: {
      const float* t = tables().byte_table(dt);  // one byte per element: a 256-entry lookup
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(t[src[i]]);
      break;
    }
    case DType::F4: {
      // Two elements per byte, the first in the low nibble (as torch.float4_e2m1fn_x2 packs them).
      const float* t = tables().f4;
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(t[(src[i >> 1] >> ((i & 1) * 4)) & 0xF]);
      break;
    }
    case DType::F6_E2M3:
    case DType::F6_E3M2:
    case DType::C64:
      return 0;  // refused by check_convertible before any block runs
    case DType::I64: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<int64_t>(src, i)); return 0;
    case DType::I32: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<int32_t>(src, i)); return 0;
    case DType::I16: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<int16_t>(src, i)); return 0;
    case DType::I8: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<int8_t>(src, i)); return 0;
    case DType::U64: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<uint64_t>(src, i)); return 0;
    case DType::U32: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<uint32_t>(src, i)); return 0;
    case DType::U16: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load<uint16_t>(src, i)); return 0;
    case DType::U8: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]); return 0;
    case DType::BOOL: for (size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] != 0); return 0;
  }
  for (size_t i = 0; i < n; ++i) bad += !std::isfinite(dst[i]);
  return bad;
}

constexpr size_t kBlock = 4096;  // elements per inner block: both inputs stay in L1/L2

}  // namespace

namespace {
void check_convertible(DType dt, size_t n) {
  PYSAFE_CHECK(dtype_convertible(dt), Value, "unsupported_dtype", "cannot convert ", dtype_name(dt),
               " to real values: ",
               dt == DType::C64 ? "the values are complex" : "no reference reader fixes the F6 bit packing");
  PYSAFE_CHECK(n * dtype_bits(dt) % 8 == 0, Value, "partial_byte", n, " elements of ", dtype_name(dt),
               " do not fill whole bytes");
}
}  // namespace

template <typename T>
uint64_t upcast(const uint8_t* src, DType dt, size_t n, T* dst) {
  check_convertible(dt, n);
  size_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<uint64_t> bad(nblocks, 0);
  parallel_for(nblocks, 16, [&](size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
      size_t i = b * kBlock, m = std::min(kBlock, n - i);
      bad[b] = convert_block<T>(src + dtype_nbytes(dt, i), dt, m, dst + i);
    }
  });
  uint64_t total = 0;
  for (auto v : bad) total += v;
  return total;
}

template <typename T>
DeltaStats fused_delta(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n,
                       T* base_out, T* delta_out) {
  check_convertible(tdt, n);
  check_convertible(bdt, n);
  const size_t nblocks = (n + kBlock - 1) / kBlock;
  // Per-block partials, reduced in block order: deterministic whatever the thread count.
  std::vector<DeltaStats> part(nblocks);
  parallel_for(nblocks, 16, [&](size_t b0, size_t b1) {
    std::vector<T> tb(kBlock), bb(kBlock);
    for (size_t b = b0; b < b1; ++b) {
      size_t i = b * kBlock, m = std::min(kBlock, n - i);
      T* bdst = base_out ? base_out + i : bb.data();
      DeltaStats s;
      s.nonfinite_tuned = convert_block<T>(tuned + dtype_nbytes(tdt, i), tdt, m, tb.data());
      s.nonfinite_base = convert_block<T>(base + dtype_nbytes(bdt, i), bdt, m, bdst);
      T* d = delta_out + i;
      double ssb = 0.0, ssd = 0.0;
      for (size_t j = 0; j < m; ++j) {
        T bv = bdst[j];
        T dv = tb[j] - bv;
        d[j] = dv;
        ssb += static_cast<double>(bv) * static_cast<double>(bv);
        ssd += static_cast<double>(dv) * static_cast<double>(dv);
      }
      s.sumsq_base = ssb;
      s.sumsq_delta = ssd;
      part[b] = s;
    }
  });
  DeltaStats total;
  for (auto& s : part) {
    total.nonfinite_base += s.nonfinite_base;
    total.nonfinite_tuned += s.nonfinite_tuned;
    total.sumsq_base += s.sumsq_base;
    total.sumsq_delta += s.sumsq_delta;
  }
  return total;
}

template uint64_t upcast<float>(const uint8_t*, DType, size_t, float*);
template uint64_t upcast<double>(const uint8_t*, DType, size_t, double*);
template DeltaStats fused_delta<float>(const uint8_t*, DType, const uint8_t*, DType, size_t, float*, float*);
template DeltaStats fused_delta<double>(const uint8_t*, DType, const uint8_t*, DType, size_t, double*, double*);

}  // namespace pysafe

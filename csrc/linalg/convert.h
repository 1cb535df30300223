// Upcast of every safetensors dtype to f32/f64, and the fused read-upcast-subtract that forms
// ΔW = W_tuned − W_base directly in f32/f64 (never in the storage dtype: bf16 cannot represent
// most small deltas; engine.md §2).
#pragma once

#include <cstddef>
#include <cstdint>

#include "io/safetensors.h"

namespace pysafe {

/// Statistics gathered in the same pass as the conversion.
struct DeltaStats {
  uint64_t nonfinite_base = 0;   ///< NaN/Inf entries in the base input
  uint64_t nonfinite_tuned = 0;  ///< NaN/Inf entries in the tuned input
  double sumsq_base = 0.0;       ///< ‖W_base‖_F² (f64 accumulation over every entry: NaN/Inf if one is)
  double sumsq_delta = 0.0;      ///< ‖ΔW‖_F²
};

/// dst[i] = (T) src[i] for n elements of `src_dtype`. Returns the count of non-finite values.
template <typename T>
uint64_t upcast(const uint8_t* src, DType src_dtype, size_t n, T* dst);

/// One pass over both inputs: base_out[i] = W_b[i] (may be null), delta_out[i] = W_t[i] − W_b[i],
/// each upcast to T before the subtraction. Multi-threaded, deterministic for a thread count.
template <typename T>
DeltaStats fused_delta(const uint8_t* tuned, DType tuned_dtype, const uint8_t* base, DType base_dtype,
                       size_t n, T* base_out, T* delta_out);

/// Exact conversions used by upcast (exposed for tests and the CUDA path).
float half_to_float(uint16_t h);
float f8e4m3_to_float(uint8_t v);
float f8e5m2_to_float(uint8_t v);
float f8e8m0_to_float(uint8_t v);
float f8e4m3fnuz_to_float(uint8_t v);
float f8e5m2fnuz_to_float(uint8_t v);
float f4e2m1_to_float(uint8_t nibble);
/// False for the dtypes upcast refuses: C64 (complex) and the F6 formats (no reference decoder).
bool dtype_convertible(DType d);

}  // namespace pysafe

// CUDA part of the core, compiled only when a CUDA toolkit is found (PYSAFE_WITH_CUDA).
// The CPU build exports the same entry points: cuda_device_count() returns 0 there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pysafe::cuda {

/// Number of visible CUDA devices (0 without a driver, a device, or a CUDA build).
int device_count();

/// On-device fused upcast-and-subtract: delta[i] = f32(tuned[i]) − f32(base[i]) for BF16/F16/F32
/// inputs already on the device (raw pointers, `stream` the caller's cudaStream_t as an integer).
/// dtype codes: 0 = F32, 1 = F16, 2 = BF16.
void fused_delta_f32(const void* tuned, int tuned_dtype, const void* base, int base_dtype, size_t n, float* delta,
                     uintptr_t stream);

}  // namespace pysafe::cuda

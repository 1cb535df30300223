// CPU-only build: the CUDA entry points exist and say there is no device.
#include <stdexcept>

#include "cuda/delta_cuda.h"

namespace pysafe::cuda {

int device_count() { return 0; }

void fused_delta_f32(const void*, int, const void*, int, size_t, float*, uintptr_t) {
  throw std::runtime_error("this pysafe build has no CUDA support");
}

}  // namespace pysafe::cuda

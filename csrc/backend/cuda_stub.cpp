// A build without CUDA: the same entry points, saying there is no GPU support.
#include "backend/backend.h"
#include "core/error.h"

namespace pysafe::backend {

Backend& cuda(int ordinal) {
  PYSAFE_CHECK(false, Device, "no_cuda_build", "cuda:", ordinal,
               " requested but this pysafe build has no CUDA support (build_info()['cuda'] is False); rebuild it "
               "where nvcc and the nvidia-cublas/nvidia-cusolver packages are installed (docs/gpu.md)");
  throw;  // unreachable
}

int cuda_device_count() { return 0; }

int device_of(const void*) { return -1; }

CudaInfo cuda_info() { return {}; }

}  // namespace pysafe::backend

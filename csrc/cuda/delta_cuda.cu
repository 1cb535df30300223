#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/delta_cuda.h"

namespace pysafe::cuda {

namespace {

__device__ inline float load_as_f32(const void* p, int dtype, size_t i) {
  switch (dtype) {
    case 1: return __half2float(static_cast<const __half*>(p)[i]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__global__ void fused_delta_f32_kernel(const void* tuned, int tdt, const void* base, int bdt, size_t n,
                                       float* delta) {
  size_t stride = static_cast<size_t>(blockDim.x) * gridDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    delta[i] = load_as_f32(tuned, tdt, i) - load_as_f32(base, bdt, i);
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

void fused_delta_f32(const void* tuned, int tdt, const void* base, int bdt, size_t n, float* delta, uintptr_t stream) {
  if (n == 0) return;
  int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, 65535));
  fused_delta_f32_kernel<<<blocks, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(tuned, tdt, base, bdt, n, delta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fused_delta_f32 launch failed: ") + cudaGetErrorString(err));
}

}  // namespace pysafe::cuda

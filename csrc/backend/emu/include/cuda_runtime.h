// The emulated GPU (PYSAFE_CUDA_EMULATOR=ON builds only): the part of the CUDA runtime API that
// csrc/backend/cuda_backend.cu uses, implemented on the host by csrc/backend/emu/runtime.cpp, so that
// the CUDA backend's own code (kernels, launch geometry, staging, streams and events, the cuBLAS and
// cuSOLVER calls) runs and is tested on machines without a GPU. It is a checker, not a fast path:
//
// - kernels run block by block; the threads of a block are fibers that switch at __syncthreads, so
//   a kernel's shared-memory reductions execute as written; a barrier that some threads of a block
//   never reach is reported as a launch failure;
// - every stream is a host thread that executes its queue in order, with a random delay before each
//   operation (PYSAFE_CUDA_EMU_JITTER_US), so that work missing an event or a synchronisation races
//   and shows up as wrong numbers instead of passing by luck;
// - device addresses are not host-accessible (host code that dereferences one crashes, as with a
//   GPU); the bytes behind them end at a guard page (an overrun crashes) and start filled with NaN
//   bytes (reading memory nobody wrote shows); copies check that their ranges lie inside
//   allocations of the kinds their direction names; a copy from pageable memory behaves as the CUDA
//   documentation allows at its most adversarial (host to device: the source is read at the call;
//   device to host: the call waits for the stream).
//
// Kernel launches (`k<<<grid, block, shmem, stream>>>(args)`) are rewritten into ::emu::launch calls
// by csrc/backend/emu/translate.py; nothing in cuda_backend.cu itself changes for the emulator.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers and built-in variables -------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// one copy: the emulated device runs one block at a time (kernels on different streams take turns),
// and the threads of that block share it, as a block's threads share their shared memory
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace emu {
struct Where {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
const Where& where();  // of the fiber running now
void syncthreads();
}  // namespace emu

#define threadIdx (::emu::where().thread)
#define blockIdx (::emu::where().block)
#define blockDim (::emu::where().block_dim)
#define gridDim (::emu::where().grid_dim)
inline void __syncthreads() { ::emu::syncthreads(); }

using std::isfinite;
using std::sqrt;

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline double atomicAdd(double* p, double v) {
  uint64_t* w = reinterpret_cast<uint64_t*>(p);
  uint64_t old = __atomic_load_n(w, __ATOMIC_RELAXED), next;
  double now;
  do {
    __builtin_memcpy(&now, &old, sizeof now);
    const double sum = now + v;
    __builtin_memcpy(&next, &sum, sizeof next);
  } while (!__atomic_compare_exchange_n(w, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return now;
}

// ---- runtime API types ------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
};
namespace emu {
struct Stream;
struct Event;
}  // namespace emu
using cudaStream_t = emu::Stream*;
using cudaEvent_t = emu::Event*;

constexpr unsigned cudaStreamNonBlocking = 0x01;
constexpr unsigned cudaEventDisableTiming = 0x02;

// ---- runtime API ------------------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaDeviceSynchronize();

// ---- kernel launches (what translate.py turns `k<<<...>>>(args)` into) ------------------------------
namespace emu {

/// [p, p + bytes) lies inside one cudaMalloc allocation.
bool is_device(const void* p, size_t bytes);
/// Where the emulated device reaches the bytes at device address p (p itself for other memory).
void* to_data(const void* p);
template <typename T>
T on_data(T v) {
  if constexpr (std::is_pointer_v<T>)
    return v ? reinterpret_cast<T>(to_data(v)) : v;
  else
    return v;
}

template <typename T>
bool is_null_or_device(const T& v) {
  if constexpr (std::is_pointer_v<T>)
    return v == nullptr || is_device(v, 1);
  else
    return true;
}

struct Config {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  Config(dim3 g, dim3 b, size_t shmem = 0, cudaStream_t s = nullptr) : grid(g), block(b), shared_bytes(shmem), stream(s) {}
};

/// Queues `body` (one thread of the kernel: reads where()) over the grid of `cfg` on its stream.
/// A bad configuration sets the error cudaGetLastError returns, as a real launch does; `bad_pointer`
/// (>= 0: that argument points outside device memory) makes the kernel fault when the stream reaches it,
/// as an illegal address does.
void enqueue_kernel(const char* name, const Config& cfg, std::function<void()> body, int bad_pointer);
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), const Config& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "a kernel launch with the wrong number of arguments");
  // the arguments are copied at the launch, converted to the parameters' types, as CUDA does
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  // a kernel dereferences its pointer arguments on the device: each must be null or device memory
  int bad = -1;
  std::apply([&bad](const auto&... p) {
    int i = 0;
    ((bad < 0 && std::is_pointer_v<std::decay_t<decltype(p)>> && !is_null_or_device(p) ? bad = i : 0, ++i), ...);
  }, params);
  // the kernel runs on the device's view of its pointers (device addresses are not host-accessible)
  std::tuple<std::decay_t<P>...> data =
      std::apply([](const auto&... p) { return std::tuple<std::decay_t<P>...>(on_data(p)...); }, params);
  enqueue_kernel(name, cfg, [kernel, data]() { std::apply(kernel, data); }, bad);
}

// What cuda_backend.cu's dlopen/dlsym become: the emulated cuBLAS and cuSOLVER (mathlibs.cpp) are
// opened by the sonames the real backend asks for. PYSAFE_CUDA_EMU_HIDE=cublas (or cusolver) makes
// that library not found, to test the backend's error for a machine without it.
void* dl_open(const char* name, int flags);
void* dl_sym(void* handle, const char* symbol);

}  // namespace emu

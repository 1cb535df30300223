// The CUDA backend: the Backend primitives on one GPU. Own kernels for the element-wise passes (the
// fused upcast-subtract, the distance epilogue, column reductions in double); cuBLAS for GEMM and
// SYRK/GEAM, cuSOLVER for Householder QR.
//
// cuBLAS and cuSOLVER are loaded with dlopen on first use, not linked: the same extension then imports
// and runs its CPU path on machines without them (or without a GPU), and on a GPU machine it uses the
// libraries PyTorch's wheels install (pysafe/backend.py preloads them from the nvidia-* packages, as
// torch does; an already loaded or system-wide copy is found by its soname). The CUDA runtime is linked
// statically and finds the driver at run time, so a machine without a driver only sees 0 devices.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

#include "backend/backend.h"
#include "backend/staging.h"
#include "core/error.h"

namespace pysafe::backend {

namespace {

void check_cuda(cudaError_t e, const char* what) {
  PYSAFE_CHECK(e == cudaSuccess, Device, "cuda_error", what, " failed: ", cudaGetErrorString(e));
}

int to_int(int64_t v) {
  PYSAFE_CHECK(v >= 0 && v <= INT_MAX, Value, "dim_too_large", "matrix dimension ", v,
               " exceeds the 32-bit cuBLAS limit of ", INT_MAX);
  return static_cast<int>(v);
}

// ---- cuBLAS / cuSOLVER through dlopen ------------------------------------------------------------

void* open_first(std::initializer_list<const char*> names, std::string& found) {
  for (const char* n : names)
    if (void* h = dlopen(n, RTLD_NOW | RTLD_GLOBAL)) {
      found = n;
      return h;
    }
  return nullptr;
}

struct MathLibs {
#define PYSAFE_FN(name) decltype(&::name) name = nullptr
  PYSAFE_FN(cublasCreate_v2);
  PYSAFE_FN(cublasSetStream_v2);
  PYSAFE_FN(cublasSgemm_v2);
  PYSAFE_FN(cublasDgemm_v2);
  PYSAFE_FN(cublasDsyrk_v2);
  PYSAFE_FN(cublasSgeam);
  PYSAFE_FN(cublasDgeam);
  PYSAFE_FN(cusolverDnCreate);
  PYSAFE_FN(cusolverDnSetStream);
  PYSAFE_FN(cusolverDnSgeqrf_bufferSize);
  PYSAFE_FN(cusolverDnDgeqrf_bufferSize);
  PYSAFE_FN(cusolverDnSgeqrf);
  PYSAFE_FN(cusolverDnDgeqrf);
  PYSAFE_FN(cusolverDnSorgqr_bufferSize);
  PYSAFE_FN(cusolverDnDorgqr_bufferSize);
  PYSAFE_FN(cusolverDnSorgqr);
  PYSAFE_FN(cusolverDnDorgqr);
#undef PYSAFE_FN
  std::string names;

  static const MathLibs& get() {
    static MathLibs libs = load();
    return libs;
  }

 private:
  static MathLibs load() {
    MathLibs L;
    std::string blas_name, solver_name;
    void* blas = open_first({"libcublas.so.13", "libcublas.so.12", "libcublas.so"}, blas_name);
    PYSAFE_CHECK(blas != nullptr, Device, "no_cublas",
                 "the CUDA backend needs cuBLAS (libcublas.so.13 or .12), which was not found: install the "
                 "nvidia-cublas package (PyTorch's CUDA wheels depend on it) or add its lib folder to "
                 "LD_LIBRARY_PATH");
    void* solver = open_first({"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"}, solver_name);
    PYSAFE_CHECK(solver != nullptr, Device, "no_cusolver",
                 "the CUDA backend needs cuSOLVER (libcusolver.so.12 or .11), which was not found: install the "
                 "nvidia-cusolver package (PyTorch's CUDA wheels depend on it) or add its lib folder to "
                 "LD_LIBRARY_PATH");
    auto sym = [](void* h, const char* lib, const char* name) {
      void* p = dlsym(h, name);
      PYSAFE_CHECK(p != nullptr, Device, "cuda_symbol", lib, " has no symbol ", name, " (too old a version?)");
      return p;
    };
#define PYSAFE_LOAD(h, lib, name) L.name = reinterpret_cast<decltype(L.name)>(sym(h, lib.c_str(), #name))
    PYSAFE_LOAD(blas, blas_name, cublasCreate_v2);
    PYSAFE_LOAD(blas, blas_name, cublasSetStream_v2);
    PYSAFE_LOAD(blas, blas_name, cublasSgemm_v2);
    PYSAFE_LOAD(blas, blas_name, cublasDgemm_v2);
    PYSAFE_LOAD(blas, blas_name, cublasDsyrk_v2);
    PYSAFE_LOAD(blas, blas_name, cublasSgeam);
    PYSAFE_LOAD(blas, blas_name, cublasDgeam);
    PYSAFE_LOAD(solver, solver_name, cusolverDnCreate);
    PYSAFE_LOAD(solver, solver_name, cusolverDnSetStream);
    PYSAFE_LOAD(solver, solver_name, cusolverDnSgeqrf_bufferSize);
    PYSAFE_LOAD(solver, solver_name, cusolverDnDgeqrf_bufferSize);
    PYSAFE_LOAD(solver, solver_name, cusolverDnSgeqrf);
    PYSAFE_LOAD(solver, solver_name, cusolverDnDgeqrf);
    PYSAFE_LOAD(solver, solver_name, cusolverDnSorgqr_bufferSize);
    PYSAFE_LOAD(solver, solver_name, cusolverDnDorgqr_bufferSize);
    PYSAFE_LOAD(solver, solver_name, cusolverDnSorgqr);
    PYSAFE_LOAD(solver, solver_name, cusolverDnDorgqr);
#undef PYSAFE_LOAD
    L.names = blas_name + ", " + solver_name;
    return L;
  }
};

void check_blas(cublasStatus_t s, const char* what) {
  PYSAFE_CHECK(s == CUBLAS_STATUS_SUCCESS, Device, "cublas_error", what, " failed with cuBLAS status ",
               static_cast<int>(s));
}
void check_solver(cusolverStatus_t s, const char* what) {
  PYSAFE_CHECK(s == CUSOLVER_STATUS_SUCCESS, Device, "cusolver_error", what, " failed with cuSOLVER status ",
               static_cast<int>(s));
}

// ---- kernels -------------------------------------------------------------------------------------

constexpr int kThreads = 256;

// Each of the two pinned staging buffers (the CUDA emulator's test build makes them smaller, so that
// its tests cross several chunks with small inputs).
#ifndef PYSAFE_CUDA_STAGE_BYTES
#define PYSAFE_CUDA_STAGE_BYTES (size_t(32) << 20)
#endif
constexpr size_t kStageBytes = PYSAFE_CUDA_STAGE_BYTES;

// DType codes the device upcast reads (the common storage dtypes of checkpoints).
__device__ inline double load_f64(const uint8_t* p, int dt, size_t i) {
  switch (dt) {
    case 0: return reinterpret_cast<const double*>(p)[i];
    case 1: return static_cast<double>(reinterpret_cast<const float*>(p)[i]);
    case 2: return static_cast<double>(__half2float(reinterpret_cast<const __half*>(p)[i]));
    default: return static_cast<double>(__bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]));
  }
}
bool device_upcasts(DType d) { return d == DType::F64 || d == DType::F32 || d == DType::F16 || d == DType::BF16; }
int device_dtype(DType d) {
  switch (d) {
    case DType::F64: return 0;
    case DType::F32: return 1;
    case DType::F16: return 2;
    case DType::BF16: return 3;
    default: break;
  }
  PYSAFE_CHECK(false, Value, "unsupported_dtype", "the CUDA backend upcasts F64, F32, F16 and BF16, not ",
               dtype_name(d), "; use --device cpu for this checkpoint");
  return -1;
}

// Block-wide sum of a double into *out (one atomicAdd per block).
__device__ inline void block_add(double v, double* out) {
  __shared__ double sh[kThreads];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, sh[0]);
}

// counters: [0] non-finite base, [1] non-finite tuned (after the upcast to T, as the CPU pass counts them);
// sums: [0] ‖base‖², [1] ‖Δ‖² over every entry (NaN or Inf when some entry is: the caller skips the tensor).
template <typename T>
__global__ void fused_delta_kernel(const uint8_t* tuned, int tdt, const uint8_t* base, int bdt, size_t n,
                                   T* base_out, T* delta, unsigned long long* counters, double* sums) {
  double sb = 0.0, sd = 0.0;
  unsigned long long nb = 0, nt = 0;
  const size_t stride = static_cast<size_t>(blockDim.x) * gridDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const T b = static_cast<T>(load_f64(base, bdt, i)), t = static_cast<T>(load_f64(tuned, tdt, i));
    const T d = t - b;
    if (base_out) base_out[i] = b;
    delta[i] = d;
    nb += !isfinite(static_cast<double>(b));
    nt += !isfinite(static_cast<double>(t));
    sb += static_cast<double>(b) * b;
    sd += static_cast<double>(d) * d;
  }
  if (nb) atomicAdd(counters, nb);
  if (nt) atomicAdd(counters + 1, nt);
  block_add(sb, sums);
  block_add(sd, sums + 1);
}

// out[j] += Σ over a slice of rows of X[r, j]² (R − θU residual when U != nullptr). Grid: (cols, row slices).
template <typename T>
__global__ void col_sumsq_kernel(const T* X, const T* U, const double* theta, int64_t rows, int64_t cols,
                                 double* out) {
  const int64_t j = blockIdx.x;
  double s = 0.0;
  for (int64_t r = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    double v = static_cast<double>(X[r * cols + j]);
    if (U) v -= theta[j] * static_cast<double>(U[r * cols + j]);
    s += v * v;
  }
  block_add(s, out + j);
}

// out[j] += Σ over a slice of rows of P[r, j]. Grid: (cols, row slices).
template <typename T>
__global__ void col_sum_kernel(const T* P, int64_t rows, int64_t cols, double* out) {
  const int64_t j = blockIdx.x;
  double s = 0.0;
  for (int64_t r = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.y) * blockDim.x)
    s += static_cast<double>(P[r * cols + j]);
  block_add(s, out + j);
}

// Block-wide sum of a double, returned to every thread of the block.
__device__ inline double block_sum(double v) {
  __shared__ double sh[kThreads];
  __syncthreads();  // the previous call's readers are done with sh
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  return sh[0];
}

// One block per row i: X[i] = T(P[i] − μ) or T(P[i]·inv_i) (cosine, inv_i = 1/‖P[i]‖ in double, 0 for a
// zero row), sq[i] = ‖X[i]‖² in double.
template <typename T>
__global__ void prepare_rows_kernel(const T* P, int64_t cols, bool cosine, const double* mu, T* X, double* sq,
                                    double* inv) {
  const int64_t i = blockIdx.x;
  const T* row = P + i * cols;
  T* out = X + i * cols;
  double iv = 0.0;
  if (cosine) {
    double s = 0.0;
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) s += static_cast<double>(row[k]) * row[k];
    s = block_sum(s);
    iv = s > 0 ? 1.0 / sqrt(s) : 0.0;
    if (threadIdx.x == 0) inv[i] = iv;
  }
  double t = 0.0;
  for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
    const T v = static_cast<T>(cosine ? static_cast<double>(row[k]) * iv : static_cast<double>(row[k]) - mu[k]);
    out[k] = v;
    t += static_cast<double>(v) * v;
  }
  t = block_sum(t);
  if (threadIdx.x == 0) sq[i] = t;
}

template <typename T>
__global__ void widen_kernel(const T* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, j = i % cols;
    dst[r * ldd + j] = static_cast<double>(src[r * lds + j]);
  }
}

template <typename T>
__global__ void narrow_kernel(const double* src, int64_t rows, int64_t cols, const double* div, T* dst) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = static_cast<T>(src[i] / div[i % cols]);
}

template <typename T>
__global__ void epilogue_kernel(T* G, int64_t rows, int64_t cols, const T* sa, const T* sb, const T* ca,
                                const T* nb, bool euclid, unsigned long long* marked) {
  const int64_t n = rows * cols;
  unsigned long long mk = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, q = i % cols;
    const T s2 = sa[r] + sb[q] - T(2) * G[i];
    if (s2 < ca[r] * nb[q]) {
      G[i] = T(-1);
      ++mk;
    } else {
      const T c = s2 > T(0) ? s2 : T(0);
      G[i] = euclid ? sqrt(c) : (T(0.5) * c < T(2) ? T(0.5) * c : T(2));
    }
  }
  if (mk) atomicAdd(marked, mk);
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

// ---- the backend ---------------------------------------------------------------------------------

class CudaBackend final : public Typed<CudaBackend> {
 public:
  explicit CudaBackend(int ordinal) : ordinal_(ordinal) {
    const MathLibs& L = MathLibs::get();
    Select on(ordinal_);
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int s = 0; s < 2; ++s) {
      check_cuda(cudaStreamCreateWithFlags(&copy_[s], cudaStreamNonBlocking), "cudaStreamCreate");
      check_cuda(cudaEventCreateWithFlags(&done_[s], cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaMallocHost(&pinned_[s], kStageBytes), "cudaMallocHost (staging buffer)");
    }
    check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
    check_blas(L.cublasCreate_v2(&blas_), "cublasCreate");
    check_blas(L.cublasSetStream_v2(blas_, stream_), "cublasSetStream");
    check_solver(L.cusolverDnCreate(&solver_), "cusolverDnCreate");
    check_solver(L.cusolverDnSetStream(solver_, stream_), "cusolverDnSetStream");
    check_cuda(cudaMalloc(&scratch_, 64), "cudaMalloc");
  }
  // The backends live until the process exits (the driver releases their resources then).

  std::string name() const override { return "cuda:" + std::to_string(ordinal_); }
  bool host_memory() const override { return false; }
  bool upcasts(DType d) const override { return device_upcasts(d); }

  void* alloc(size_t bytes) override {
    Select on(ordinal_);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      PYSAFE_CHECK(false, Device, "cuda_out_of_memory", name(), ": cannot allocate ", bytes, " bytes (",
                   free_b >> 20, " MiB free of ", total_b >> 20, " MiB)");
    }
    check_cuda(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemset");
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    held_ += bytes;
    peak_ = std::max(peak_, held_);
    return p;
  }
  void release(void* p) noexcept override {
    if (!p) return;
    Select on(ordinal_);
    cudaStreamSynchronize(stream_);  // work queued on it may still read p
    cudaFree(p);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      held_ -= it->second;
      sizes_.erase(it);
    }
  }
  // Through the two pinned buffers: the memcpy into one overlaps the DMA out of the other.
  void upload(void* dst, const void* src, size_t bytes) override {
    Lock lock(op_mu_);
    Select on(ordinal_);
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // dst may still be in use
    for (const Chunk& c : plan_chunks(bytes, kStageBytes, 1)) {
      check_cuda(cudaEventSynchronize(done_[c.slot]), "cudaEventSynchronize");
      std::memcpy(pinned_[c.slot], static_cast<const uint8_t*>(src) + c.offset, c.bytes);
      check_cuda(cudaMemcpyAsync(static_cast<uint8_t*>(dst) + c.offset, pinned_[c.slot], c.bytes,
                                 cudaMemcpyHostToDevice, copy_[c.slot]),
                 "cudaMemcpyAsync (host to device)");
      check_cuda(cudaEventRecord(done_[c.slot], copy_[c.slot]), "cudaEventRecord");
    }
    for (int s = 0; s < 2; ++s) check_cuda(cudaStreamSynchronize(copy_[s]), "cudaStreamSynchronize");
  }
  void download(void* dst, const void* src, size_t bytes) override {
    Lock lock(op_mu_);
    Select on(ordinal_);
    for (const Chunk& c : plan_chunks(bytes, kStageBytes, 1)) {
      check_cuda(cudaMemcpyAsync(pinned_[0], static_cast<const uint8_t*>(src) + c.offset, c.bytes,
                                 cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync (device to host)");
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      std::memcpy(static_cast<uint8_t*>(dst) + c.offset, pinned_[0], c.bytes);
    }
  }
  void copy2d(void* dst, int64_t ldd, const void* src, int64_t lds, int64_t rows, int64_t cols,
              size_t elem) override {
    if (rows == 0 || cols == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    check_cuda(cudaMemcpy2DAsync(dst, static_cast<size_t>(ldd) * elem, src, static_cast<size_t>(lds) * elem,
                                 static_cast<size_t>(cols) * elem, static_cast<size_t>(rows), cudaMemcpyDeviceToDevice,
                                 stream_),
               "cudaMemcpy2DAsync");
  }
  size_t peak_bytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_;
  }
  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = held_;
  }

 private:
  friend class Typed<CudaBackend>;  // the float/double overrides call the templates below

  // Makes this backend's device current for the scope (the caller's current device is restored).
  struct Select {
    int previous = 0;
    explicit Select(int d) {
      cudaGetDevice(&previous);
      if (previous != d) check_cuda(cudaSetDevice(d), "cudaSetDevice");
    }
    ~Select() {
      int now = 0;
      cudaGetDevice(&now);
      if (now != previous) cudaSetDevice(previous);
    }
  };

  // One caller at a time per device: the engine runs the SVDs of ΔW and W_base on two host threads, and
  // they share this backend's stream, handles, staging buffers and scratch word (the stream orders
  // their device work; the lock keeps the host-side sequences whole).
  using Lock = std::lock_guard<std::recursive_mutex>;
  std::recursive_mutex op_mu_;

  void sync() { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ on the same memory.
  template <typename T>
  void gemm_t(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
              int64_t ldb, T beta, T* C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    const MathLibs& L = MathLibs::get();
    auto gemm = [&](auto fn, const char* what) {
      check_blas(fn(blas_, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, to_int(N), to_int(M),
                    to_int(K), &alpha, B, to_int(ldb), A, to_int(lda), &beta, C, to_int(ldc)),
                 what);
    };
    if constexpr (std::is_same_v<T, float>)
      gemm(L.cublasSgemm_v2, "cublasSgemm");
    else
      gemm(L.cublasDgemm_v2, "cublasDgemm");
  }

  // Householder QR by cuSOLVER (geqrf + orgqr) for both the full and the conditioning step: an
  // orthonormal basis is also a well-conditioned one, and on the GPU the panel QR of these tall,
  // narrow blocks is cheap next to the products with A. Row-major A (m×n) is transposed into a
  // column-major m×n copy and back (geam).
  template <typename T>
  blas::OrthoPath ortho_t(int64_t m, int64_t n, T* A, bool) {
    if (n == 0) return blas::OrthoPath::kHouseholder;
    Lock lock(op_mu_);
    PYSAFE_ASSERT(m >= n);
    Select on(ordinal_);
    const MathLibs& L = MathLibs::get();
    const int im = to_int(m), in = to_int(n);
    Buffer<T> X(*this, static_cast<size_t>(m * n)), tau(*this, static_cast<size_t>(n));
    const T one = 1, zero = 0;
    auto geam = [&](int rows, int cols, const T* src, int lds, T* dst, int ldd) {
      if constexpr (std::is_same_v<T, float>)
        check_blas(L.cublasSgeam(blas_, CUBLAS_OP_T, CUBLAS_OP_N, rows, cols, &one, src, lds, &zero, dst, ldd, dst, ldd),
                   "cublasSgeam");
      else
        check_blas(L.cublasDgeam(blas_, CUBLAS_OP_T, CUBLAS_OP_N, rows, cols, &one, src, lds, &zero, dst, ldd, dst, ldd),
                   "cublasDgeam");
    };
    geam(im, in, A, in, X.data(), im);  // X (col-major m×n) = A
    int lw_qr = 0, lw_q = 0;
    if constexpr (std::is_same_v<T, float>) {
      check_solver(L.cusolverDnSgeqrf_bufferSize(solver_, im, in, X.data(), im, &lw_qr), "cusolverDnSgeqrf_bufferSize");
      check_solver(L.cusolverDnSorgqr_bufferSize(solver_, im, in, in, X.data(), im, tau.data(), &lw_q),
                   "cusolverDnSorgqr_bufferSize");
    } else {
      check_solver(L.cusolverDnDgeqrf_bufferSize(solver_, im, in, X.data(), im, &lw_qr), "cusolverDnDgeqrf_bufferSize");
      check_solver(L.cusolverDnDorgqr_bufferSize(solver_, im, in, in, X.data(), im, tau.data(), &lw_q),
                   "cusolverDnDorgqr_bufferSize");
    }
    Buffer<T> work(*this, static_cast<size_t>(std::max({lw_qr, lw_q, 1})));
    int* info = static_cast<int*>(scratch_);
    const int lw = static_cast<int>(work.size());
    if constexpr (std::is_same_v<T, float>) {
      check_solver(L.cusolverDnSgeqrf(solver_, im, in, X.data(), im, tau.data(), work.data(), lw, info), "cusolverDnSgeqrf");
      check_solver(L.cusolverDnSorgqr(solver_, im, in, in, X.data(), im, tau.data(), work.data(), lw, info),
                   "cusolverDnSorgqr");
    } else {
      check_solver(L.cusolverDnDgeqrf(solver_, im, in, X.data(), im, tau.data(), work.data(), lw, info), "cusolverDnDgeqrf");
      check_solver(L.cusolverDnDorgqr(solver_, im, in, in, X.data(), im, tau.data(), work.data(), lw, info),
                   "cusolverDnDorgqr");
    }
    int h_info = 0;
    check_cuda(cudaMemcpyAsync(&h_info, info, sizeof(int), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    sync();
    PYSAFE_CHECK(h_info == 0, Value, "cusolver", "Householder QR on ", name(), " failed with info=", h_info);
    geam(in, im, X.data(), im, A, in);  // A (col-major n×m) = Xᵀ
    return blas::OrthoPath::kHouseholder;
  }

  // G (d×d, upper triangle row-major) = AᵀA or AAᵀ in double: A uploaded (or its resident copy read),
  // widened on the device, one SYRK.
  // Row-major A (m×n) is column-major X (n×m): AᵀA = X·Xᵀ, AAᵀ = Xᵀ·X; the column-major lower triangle
  // is the row-major upper one.
  template <typename T>
  void gram_t(int64_t m, int64_t n, const T* A, bool columns, std::vector<double>& G, const T* resident) {
    Lock lock(op_mu_);
    const int64_t d = columns ? n : m;
    G.assign(static_cast<size_t>(d * d), 0.0);
    if (d == 0 || m == 0 || n == 0) return;
    Select on(ordinal_);
    Buffer<double> Xd(*this, static_cast<size_t>(m * n)), Gd(*this, static_cast<size_t>(d * d));
    {
      HostView<T> Av(*this, A, static_cast<size_t>(m * n), resident);
      to_f64_t(Av.data(), n, m, n, Xd.data(), n);
      sync();
    }
    const double one = 1.0, zero = 0.0;
    check_blas(MathLibs::get().cublasDsyrk_v2(blas_, CUBLAS_FILL_MODE_LOWER, columns ? CUBLAS_OP_N : CUBLAS_OP_T,
                                              to_int(d), to_int(columns ? m : n), &one, Xd.data(), to_int(n), &zero,
                                              Gd.data(), to_int(d)),
               "cublasDsyrk");
    sync();
    download(G.data(), Gd.data(), G.size() * sizeof(double));
  }

  template <typename T>
  void col_norms_t(const T* Y, int64_t rows, int64_t cols, std::vector<double>& out) {
    residual_t(Y, static_cast<const T*>(nullptr), rows, cols, {}, out);
    for (auto& v : out) v = std::sqrt(v);
  }
  // Σ_r (R − θU)² per column, or Σ_r R² when U is null.
  template <typename T>
  void residual_t(const T* X, const T* U, int64_t rows, int64_t cols, const std::vector<double>& theta,
                  std::vector<double>& out) {
    out.assign(static_cast<size_t>(cols), 0.0);
    if (rows == 0 || cols == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    Buffer<double> acc(*this, static_cast<size_t>(cols)), th(*this, U ? static_cast<size_t>(cols) : 0);
    if (U) upload(th.data(), theta.data(), static_cast<size_t>(cols) * sizeof(double));
    const unsigned slices = static_cast<unsigned>(std::min<int64_t>(64, (rows + kThreads - 1) / kThreads));
    col_sumsq_kernel<T><<<dim3(static_cast<unsigned>(cols), slices), kThreads, 0, stream_>>>(X, U, th.data(), rows,
                                                                                           cols, acc.data());
    check_launch("col_sumsq_kernel");
    sync();
    download(out.data(), acc.data(), out.size() * sizeof(double));
  }

  template <typename T>
  void to_f64_t(const T* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
    if (rows == 0 || cols == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    widen_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream_>>>(src, lds, rows, cols, dst, ldd);
    check_launch("widen_kernel");
  }

  template <typename T>
  void from_f64_div_t(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div, T* dst) {
    if (rows == 0 || cols == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    Buffer<double> dv(*this, static_cast<size_t>(cols));
    upload(dv.data(), div.data(), static_cast<size_t>(cols) * sizeof(double));
    narrow_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream_>>>(src, rows, cols, dv.data(), dst);
    check_launch("narrow_kernel");
    sync();
  }

  template <typename T>
  DeltaStats fused_delta_t(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n, T* base_out,
                           T* delta) {
    if (n == 0) return {};
    Lock lock(op_mu_);
    const int t = device_dtype(tdt), b = device_dtype(bdt);
    Select on(ordinal_);
    Buffer<unsigned long long> counters(*this, 2);
    Buffer<double> sums(*this, 2);
    fused_delta_kernel<T><<<grid_for(static_cast<int64_t>(n)), kThreads, 0, stream_>>>(
        tuned, t, base, b, n, base_out, delta, counters.data(), sums.data());
    check_launch("fused_delta_kernel");
    sync();
    return delta_stats(counters, sums);
  }

  // The statistics the fused kernel accumulated: counters [non-finite base, tuned], sums [‖base‖², ‖Δ‖²].
  DeltaStats delta_stats(const Buffer<unsigned long long>& counters, const Buffer<double>& sums) const {
    const auto c = counters.to_host();
    const auto s = sums.to_host();
    DeltaStats st;
    st.nonfinite_base = c[0];
    st.nonfinite_tuned = c[1];
    st.sumsq_base = s[0];
    st.sumsq_delta = s[1];
    return st;
  }

  // The raw bytes of both tensors from the host, chunk by chunk: chunk i is copied from the host into
  // pinned buffer i % 2 (tuned bytes, then base bytes), sent to device buffer i % 2 on copy stream
  // i % 2, and upcast there by the fused kernel on the same stream, so that the kernel of chunk i runs
  // while chunk i + 1 is copied and sent on the other stream. The counters and sums accumulate over
  // the chunks (atomics); the summation order differs from the CPU's, the values written do not.
  template <typename T>
  DeltaStats upload_delta_t(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n, T* base_out,
                            T* delta) {
    if (n == 0) return {};
    Lock lock(op_mu_);
    const int t = device_dtype(tdt), b = device_dtype(bdt);
    const size_t ts = dtype_bits(tdt) / 8, bs = dtype_bits(bdt) / 8, per = ts + bs;
    Select on(ordinal_);
    const std::vector<Chunk> plan = plan_chunks(n * per, kStageBytes, per);
    const size_t raw_bytes = plan.front().bytes;
    Buffer<unsigned long long> counters(*this, 2);
    Buffer<double> sums(*this, 2);
    Buffer<uint8_t> raw0(*this, raw_bytes), raw1(*this, plan.size() > 1 ? raw_bytes : 0);
    uint8_t* raw[2] = {raw0.data(), raw1.data()};
    // The copy streams start after the zero-filling of these buffers and of the outputs (on stream_).
    check_cuda(cudaEventRecord(ready_, stream_), "cudaEventRecord");
    for (int s = 0; s < 2; ++s) check_cuda(cudaStreamWaitEvent(copy_[s], ready_, 0), "cudaStreamWaitEvent");
    for (const Chunk& c : plan) {
      const size_t first = c.offset / per, count = c.bytes / per;
      uint8_t* pin = static_cast<uint8_t*>(pinned_[c.slot]);
      check_cuda(cudaEventSynchronize(done_[c.slot]), "cudaEventSynchronize");  // the pinned buffer is free
      std::memcpy(pin, tuned + first * ts, count * ts);
      std::memcpy(pin + count * ts, base + first * bs, count * bs);
      check_cuda(cudaMemcpyAsync(raw[c.slot], pin, c.bytes, cudaMemcpyHostToDevice, copy_[c.slot]),
                 "cudaMemcpyAsync (host to device)");
      check_cuda(cudaEventRecord(done_[c.slot], copy_[c.slot]), "cudaEventRecord");
      fused_delta_kernel<T><<<grid_for(static_cast<int64_t>(count)), kThreads, 0, copy_[c.slot]>>>(
          raw[c.slot], t, raw[c.slot] + count * ts, b, count, base_out ? base_out + first : nullptr, delta + first,
          counters.data(), sums.data());
      check_launch("fused_delta_kernel");
    }
    for (int s = 0; s < 2; ++s) check_cuda(cudaStreamSynchronize(copy_[s]), "cudaStreamSynchronize");
    return delta_stats(counters, sums);
  }

  template <typename T>
  void col_sums_t(const T* P, int64_t rows, int64_t cols, std::vector<double>& out) {
    out.assign(static_cast<size_t>(cols), 0.0);
    if (rows == 0 || cols == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    Buffer<double> acc(*this, static_cast<size_t>(cols));
    const unsigned slices = static_cast<unsigned>(std::min<int64_t>(64, (rows + kThreads - 1) / kThreads));
    col_sum_kernel<T><<<dim3(static_cast<unsigned>(cols), slices), kThreads, 0, stream_>>>(P, rows, cols, acc.data());
    check_launch("col_sum_kernel");
    sync();
    download(out.data(), acc.data(), out.size() * sizeof(double));
  }

  template <typename T>
  void prepare_rows_t(const T* P, int64_t rows, int64_t cols, bool cosine, const std::vector<double>& mu, T* X,
                      std::vector<double>& sq, std::vector<double>& inv) {
    sq.assign(static_cast<size_t>(rows), 0.0);
    inv.assign(cosine ? static_cast<size_t>(rows) : 0, 0.0);
    if (rows == 0) return;
    Lock lock(op_mu_);
    Select on(ordinal_);
    PYSAFE_CHECK(rows <= INT_MAX, Value, "dim_too_large", "cannot prepare ", rows, " rows in one launch");
    Buffer<double> mud(*this, cosine ? 0 : static_cast<size_t>(cols)), sqd(*this, static_cast<size_t>(rows)),
        invd(*this, cosine ? static_cast<size_t>(rows) : 0);
    if (!cosine && cols > 0) upload(mud.data(), mu.data(), static_cast<size_t>(cols) * sizeof(double));
    prepare_rows_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream_>>>(P, cols, cosine, mud.data(), X,
                                                                                  sqd.data(), invd.data());
    check_launch("prepare_rows_kernel");
    sync();
    download(sq.data(), sqd.data(), sq.size() * sizeof(double));
    if (cosine) download(inv.data(), invd.data(), inv.size() * sizeof(double));
  }

  void synchronize_device() override {
    Select on(ordinal_);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }

  template <typename T>
  int64_t epilogue_t(T* G, int64_t rows, int64_t cols, const T* sa, const T* sb, const T* ca, const T* nb,
                     bool euclid) {
    if (rows == 0 || cols == 0) return 0;
    Lock lock(op_mu_);
    Select on(ordinal_);
    Buffer<unsigned long long> marked(*this, 1);
    epilogue_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream_>>>(G, rows, cols, sa, sb, ca, nb, euclid,
                                                                        marked.data());
    check_launch("epilogue_kernel");
    sync();
    return static_cast<int64_t>(marked.to_host()[0]);
  }

  int ordinal_;
  cudaStream_t stream_ = nullptr, copy_[2] = {nullptr, nullptr};
  cudaEvent_t done_[2] = {nullptr, nullptr}, ready_ = nullptr;
  void* pinned_[2] = {nullptr, nullptr};
  void* scratch_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  mutable std::mutex mu_;
  std::map<void*, size_t> sizes_;
  size_t held_ = 0, peak_ = 0;
};

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int device_of(const void* p) {
  if (cuda_device_count() == 0) return -1;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged ? a.device : -1;
}

Backend& cuda(int ordinal) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<CudaBackend>> backends;
  std::lock_guard<std::mutex> lock(mu);
  auto it = backends.find(ordinal);
  if (it != backends.end()) return *it->second;
  const int count = cuda_device_count();
  PYSAFE_CHECK(count > 0, Device, "no_cuda_device", "cuda:", ordinal,
               " requested but no CUDA device is visible (no NVIDIA driver or GPU on this machine, or "
               "CUDA_VISIBLE_DEVICES hides them)");
  PYSAFE_CHECK(ordinal >= 0 && ordinal < count, Device, "no_cuda_device", "cuda:", ordinal,
               " requested but this machine has ", count, " CUDA device", count == 1 ? "" : "s", " (cuda:0",
               count > 1 ? "..cuda:" + std::to_string(count - 1) : std::string(), ")");
  auto be = std::make_unique<CudaBackend>(ordinal);
  Backend& ref = *be;
  backends.emplace(ordinal, std::move(be));
  return ref;
}

CudaInfo cuda_info() {
  CudaInfo info;
  info.built = true;
  info.stage_bytes = kStageBytes;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) cudaGetLastError();
  const int n = cuda_device_count();
  for (int d = 0; d < n; ++d) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    char buf[512];
    std::snprintf(buf, sizeof(buf), "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
                  static_cast<double>(p.totalGlobalMem) / (1 << 30));
    info.devices.emplace_back(buf);
  }
  if (n > 0) {
    try {
      info.libraries = MathLibs::get().names;
    } catch (const Error& e) {
      info.libraries = e.message();
    }
  }
  return info;
}

}  // namespace pysafe::backend

// The primitives the engine's algorithms are written against, one implementation per device: the
// faiss model, one algorithm and the device chooses where it runs. The CPU backend wraps the
// OpenBLAS/LAPACK code the engine has always used (same calls, same order: bit-identical results);
// the CUDA backend (cuda_backend.cu, built when a CUDA toolkit and the cuBLAS/cuSOLVER headers are
// found) runs the same primitives on one GPU with its own kernels and cuBLAS/cuSOLVER loaded at run time.
//
// Buffers are "device" pointers of the backend that allocated them (host pointers on the CPU).
// Matrices are row-major, as everywhere in the engine. Small results that the algorithms inspect on
// the host (Gram matrices of a block, column norms, residuals) come back in host vectors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "linalg/blas.h"
#include "linalg/convert.h"

namespace pysafe::backend {

class Backend {
 public:
  virtual ~Backend() = default;
  /// "cpu" or "cuda:N".
  virtual std::string name() const = 0;
  /// Buffers are plain host memory (host data can be used in place, without a copy).
  virtual bool host_memory() const = 0;

  // --- memory -------------------------------------------------------------------------------------
  /// Zero-filled buffer of `bytes` (freed by `release`).
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) noexcept = 0;
  /// Host -> device (through pinned staging buffers on a GPU) and device -> host.
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
  /// dst[r·ldd + j] = src[r·lds + j] for r < rows, j < cols; elements of `elem` bytes, device to device.
  virtual void copy2d(void* dst, int64_t ldd, const void* src, int64_t lds, int64_t rows, int64_t cols,
                      size_t elem) = 0;
  /// Most bytes held at once by this backend's buffers since the last `reset_peak`.
  virtual size_t peak_bytes() const = 0;
  virtual void reset_peak() = 0;

  // --- level 3 (row-major, the arguments of blas::gemm) -------------------------------------------
  virtual void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) = 0;
  virtual void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                    int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) = 0;
  /// An orthonormal basis of the columns of A (m×n, m >= n) in place: `full` as blas::orthonormalize,
  /// else only a well-conditioned one (blas::condition_basis).
  virtual blas::OrthoPath orthonormalize(int64_t m, int64_t n, float* A, bool full) = 0;
  virtual blas::OrthoPath orthonormalize(int64_t m, int64_t n, double* A, bool full) = 0;
  /// blas::gram_f64 of the HOST matrix A (m×n): upper triangle of AᵀA (columns) or AAᵀ in double.
  /// `resident`: the same matrix already in this backend's memory (read instead of uploading A), or null.
  virtual void gram_f64(int64_t m, int64_t n, const float* A, bool columns, std::vector<double>& G,
                        const float* resident) = 0;
  virtual void gram_f64(int64_t m, int64_t n, const double* A, bool columns, std::vector<double>& G,
                        const double* resident) = 0;

  // --- element-wise passes and column reductions (accumulated in double) --------------------------
  /// out[j] = ‖Y[:, j]‖₂ for Y rows×cols.
  virtual void col_norms(const float* Y, int64_t rows, int64_t cols, std::vector<double>& out) = 0;
  virtual void col_norms(const double* Y, int64_t rows, int64_t cols, std::vector<double>& out) = 0;
  /// dst[r·ldd + j] = double(src[r·lds + j]) for r < rows, j < cols.
  virtual void to_f64(const float* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) = 0;
  virtual void to_f64(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) = 0;
  /// dst[r·cols + j] = T(src[r·cols + j] / div[j]) (div: host, `cols` values).
  virtual void from_f64_div(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div,
                            float* dst) = 0;
  virtual void from_f64_div(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div,
                            double* dst) = 0;
  /// out[j] = Σ_r (R[r, j] − θ_j·U[r, j])² for R, U rows×cols (θ: host): Ritz residuals.
  virtual void residual_sumsq(const float* R, const float* U, int64_t rows, int64_t cols,
                              const std::vector<double>& theta, std::vector<double>& out) = 0;
  virtual void residual_sumsq(const double* R, const double* U, int64_t rows, int64_t cols,
                              const std::vector<double>& theta, std::vector<double>& out) = 0;
  /// The fused upcast-subtract over n elements already in this backend's memory (raw stored bytes):
  /// delta = T(tuned) − T(base), base_out = T(base) when not null; statistics as pysafe::fused_delta.
  virtual DeltaStats fused_delta(const uint8_t* tuned, DType tuned_dtype, const uint8_t* base, DType base_dtype,
                                 size_t n, float* base_out, float* delta) = 0;
  virtual DeltaStats fused_delta(const uint8_t* tuned, DType tuned_dtype, const uint8_t* base, DType base_dtype,
                                 size_t n, double* base_out, double* delta) = 0;
  /// The same fused upcast-subtract, reading the raw stored bytes from HOST memory (a memory-mapped
  /// shard) and writing base_out and delta in this backend's memory. On the CPU the bytes are read in
  /// place (the same pass as fused_delta); on a GPU they travel in chunks through the pinned staging
  /// buffers and each chunk is upcast on the device while the next one is copied (two streams).
  virtual DeltaStats upload_delta(const uint8_t* tuned, DType tuned_dtype, const uint8_t* base, DType base_dtype,
                                  size_t n, float* base_out, float* delta) = 0;
  virtual DeltaStats upload_delta(const uint8_t* tuned, DType tuned_dtype, const uint8_t* base, DType base_dtype,
                                  size_t n, double* base_out, double* delta) = 0;
  /// Whether upload_delta reads this storage dtype (every dtype on the CPU; F64/F32/F16/BF16 on a GPU).
  virtual bool upcasts(DType dtype) const = 0;
  /// The distance engine's preparation of rows it holds in this backend's memory: out[j] = Σ_r P[r, j]
  /// (col_sums, in double); X[i] = T(P[i] − μ) (μ: host, cols values) or, cosine, T(P[i] · inv[i]) with
  /// inv[i] = 1/‖P[i]‖ in double (0 for a zero row); sq[i] = ‖X[i]‖² in double (prepare_rows).
  virtual void col_sums(const float* P, int64_t rows, int64_t cols, std::vector<double>& out) = 0;
  virtual void col_sums(const double* P, int64_t rows, int64_t cols, std::vector<double>& out) = 0;
  virtual void prepare_rows(const float* P, int64_t rows, int64_t cols, bool cosine, const std::vector<double>& mu,
                            float* X, std::vector<double>& sq, std::vector<double>& inv) = 0;
  virtual void prepare_rows(const double* P, int64_t rows, int64_t cols, bool cosine, const std::vector<double>& mu,
                            double* X, std::vector<double>& sq, std::vector<double>& inv) = 0;
  /// Waits until every stream of the device is idle (data written by another library, e.g. PyTorch,
  /// on its own stream can then be read); nothing on the CPU.
  virtual void synchronize_device() = 0;
  /// The distance epilogue over a block of Gram products G (rows×cols, ld = cols) in place, row i against
  /// column q (sa, ca: rows values; sb, nb: cols values; all device vectors in T):
  ///   s² = sa[i] + sb[q] − 2G;  G = −1 where s² < ca[i]·nb[q] (untrustworthy: the caller recomputes it
  ///   difference-first), else Euclidean √max(s², 0), cosine min(½·max(s², 0), 2)
  /// (dist::kernel::gram_row on each row). Returns the number of entries marked −1.
  virtual int64_t distance_epilogue(float* G, int64_t rows, int64_t cols, const float* sa, const float* sb,
                                    const float* ca, const float* nb, bool euclid) = 0;
  virtual int64_t distance_epilogue(double* G, int64_t rows, int64_t cols, const double* sa, const double* sb,
                                    const double* ca, const double* nb, bool euclid) = 0;
};

/// The float and double overrides of Backend, each forwarding to the backend's template of the same
/// primitive (gemm_t, ortho_t, gram_t, col_norms_t, to_f64_t, from_f64_div_t, residual_t, fused_delta_t,
/// upload_delta_t, col_sums_t, prepare_rows_t, epilogue_t): a backend writes each primitive once, for both precisions (CRTP).
template <typename Impl>
class Typed : public Backend {
#define PYSAFE_TYPED_OVERRIDES(T)                                                                             \
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,  \
            int64_t ldb, T beta, T* C, int64_t ldc) override {                                                \
    self().gemm_t(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);                                      \
  }                                                                                                           \
  blas::OrthoPath orthonormalize(int64_t m, int64_t n, T* A, bool full) override {                           \
    return self().ortho_t(m, n, A, full);                                                                     \
  }                                                                                                           \
  void gram_f64(int64_t m, int64_t n, const T* A, bool columns, std::vector<double>& G, const T* resident)    \
      override {                                                                                              \
    self().gram_t(m, n, A, columns, G, resident);                                                             \
  }                                                                                                           \
  void col_norms(const T* Y, int64_t rows, int64_t cols, std::vector<double>& out) override {                \
    self().col_norms_t(Y, rows, cols, out);                                                                   \
  }                                                                                                           \
  void to_f64(const T* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) override {    \
    self().to_f64_t(src, lds, rows, cols, dst, ldd);                                                          \
  }                                                                                                           \
  void from_f64_div(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div, T* dst)    \
      override {                                                                                              \
    self().from_f64_div_t(src, rows, cols, div, dst);                                                         \
  }                                                                                                           \
  void residual_sumsq(const T* R, const T* U, int64_t rows, int64_t cols, const std::vector<double>& theta,   \
                      std::vector<double>& out) override {                                                    \
    self().residual_t(R, U, rows, cols, theta, out);                                                          \
  }                                                                                                           \
  DeltaStats fused_delta(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n,           \
                         T* base_out, T* delta) override {                                                    \
    return self().fused_delta_t(tuned, tdt, base, bdt, n, base_out, delta);                                  \
  }                                                                                                           \
  DeltaStats upload_delta(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n,          \
                          T* base_out, T* delta) override {                                                   \
    return self().upload_delta_t(tuned, tdt, base, bdt, n, base_out, delta);                                 \
  }                                                                                                           \
  void col_sums(const T* P, int64_t rows, int64_t cols, std::vector<double>& out) override {                  \
    self().col_sums_t(P, rows, cols, out);                                                                    \
  }                                                                                                           \
  void prepare_rows(const T* P, int64_t rows, int64_t cols, bool cosine, const std::vector<double>& mu, T* X, \
                    std::vector<double>& sq, std::vector<double>& inv) override {                             \
    self().prepare_rows_t(P, rows, cols, cosine, mu, X, sq, inv);                                             \
  }                                                                                                           \
  int64_t distance_epilogue(T* G, int64_t rows, int64_t cols, const T* sa, const T* sb, const T* ca,         \
                            const T* nb, bool euclid) override {                                              \
    return self().epilogue_t(G, rows, cols, sa, sb, ca, nb, euclid);                                          \
  }

 public:
  PYSAFE_TYPED_OVERRIDES(float)
  PYSAFE_TYPED_OVERRIDES(double)
#undef PYSAFE_TYPED_OVERRIDES

 private:
  Impl& self() { return static_cast<Impl&>(*this); }
};

/// The CPU backend (process-wide).
Backend& cpu();
/// The CUDA backend of device `ordinal` (one per device, created on first use). Throws a
/// DeviceUnavailable error naming what is missing: no CUDA in this build, no driver, no such device,
/// no cuBLAS/cuSOLVER library.
Backend& cuda(int ordinal);
/// device < 0: cpu(); else cuda(device).
Backend& get(int device);

/// Visible CUDA devices (0 without a driver, a device, or a CUDA build).
int cuda_device_count();
/// The CUDA device whose memory holds address p (device or managed memory), or -1 (host memory, an
/// unknown address, or a build without CUDA).
int device_of(const void* p);
/// What the CUDA side of this build is: compiled in, runtime/driver versions, devices (for build_info).
struct CudaInfo {
  bool built = false;
  int runtime_version = 0, driver_version = 0;
  std::vector<std::string> devices;  // "NVIDIA H200 (sm_90, 139.8 GiB)"
  std::string libraries;             // cuBLAS/cuSOLVER as found at run time ("" before first use)
  size_t stage_bytes = 0;            // each of the two pinned staging buffers
};
CudaInfo cuda_info();

/// A zero-filled buffer of `n` T on a backend, released on destruction; movable and swappable.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t n) : be_(&be), n_(n), p_(static_cast<T*>(n ? be.alloc(n * sizeof(T)) : nullptr)) {}
  ~Buffer() {
    if (p_) be_->release(p_);
  }
  Buffer(Buffer&& o) noexcept : be_(o.be_), n_(o.n_), p_(o.p_) { o.p_ = nullptr, o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    swap(o);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void swap(Buffer& o) noexcept {
    std::swap(be_, o.be_);
    std::swap(n_, o.n_);
    std::swap(p_, o.p_);
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  /// The whole buffer's content on the host.
  std::vector<T> to_host() const {
    std::vector<T> v(n_);
    if (n_) be_->download(v.data(), p_, n_ * sizeof(T));
    return v;
  }

 private:
  Backend* be_ = nullptr;
  size_t n_ = 0;
  T* p_ = nullptr;
};

/// Host data as the backend sees it: the pointer itself on the CPU (no copy), an uploaded copy on a GPU,
/// or `resident` when the caller already holds the same data in the backend's memory (no copy either).
template <typename T>
class HostView {
 public:
  HostView(Backend& be, const T* host, size_t n, const T* resident = nullptr) : ptr_(resident ? resident : host) {
    if (!resident && !be.host_memory()) {
      copy_ = Buffer<T>(be, n);
      be.upload(copy_.data(), host, n * sizeof(T));
      ptr_ = copy_.data();
    }
  }
  const T* data() const { return ptr_; }

 private:
  Buffer<T> copy_;
  const T* ptr_;
};

}  // namespace pysafe::backend

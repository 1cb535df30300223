// The CPU backend: the engine's OpenBLAS/LAPACK code and loops behind the Backend interface. Every
// primitive does what the algorithms did inline before the interface existed, in the same order, so
// results are bit-identical to those of earlier versions.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "backend/backend.h"
#include "core/error.h"
#include "linalg/gram_kernel.h"

namespace pysafe::backend {

namespace {

class CpuBackend final : public Typed<CpuBackend> {
 public:
  std::string name() const override { return "cpu"; }
  bool host_memory() const override { return true; }

  void* alloc(size_t bytes) override {
    // Block header: the size, for the peak accounting (16 bytes keep the data 16-byte aligned).
    auto* p = static_cast<unsigned char*>(std::calloc(1, bytes + 16));
    PYSAFE_CHECK(p != nullptr, Value, "out_of_memory", "cannot allocate ", bytes, " bytes of host memory");
    std::memcpy(p, &bytes, sizeof(bytes));
    const size_t now = held_ += bytes;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return p + 16;
  }
  void release(void* p) noexcept override {
    if (!p) return;
    auto* base = static_cast<unsigned char*>(p) - 16;
    size_t bytes;
    std::memcpy(&bytes, base, sizeof(bytes));
    held_ -= bytes;
    std::free(base);
  }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy2d(void* dst, int64_t ldd, const void* src, int64_t lds, int64_t rows, int64_t cols,
              size_t elem) override {
    auto* d = static_cast<unsigned char*>(dst);
    auto* s = static_cast<const unsigned char*>(src);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(d + static_cast<size_t>(r * ldd) * elem, s + static_cast<size_t>(r * lds) * elem,
                  static_cast<size_t>(cols) * elem);
  }
  size_t peak_bytes() const override { return peak_.load(); }
  void reset_peak() override { peak_ = held_.load(); }

  template <typename T>
  void gemm_t(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
              int64_t ldb, T beta, T* C, int64_t ldc) {
    blas::gemm<T>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  template <typename T>
  blas::OrthoPath ortho_t(int64_t m, int64_t n, T* A, bool full) {
    return full ? blas::orthonormalize<T>(m, n, A) : blas::condition_basis<T>(m, n, A);
  }
  template <typename T>
  void gram_t(int64_t m, int64_t n, const T* A, bool columns, std::vector<double>& G, const T*) {
    blas::gram_f64<T>(m, n, A, columns, G);
  }
  template <typename T>
  void col_norms_t(const T* Y, int64_t rows, int64_t cols, std::vector<double>& nn) {
    nn.assign(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) nn[j] += static_cast<double>(Y[r * cols + j]) * Y[r * cols + j];
    for (auto& v : nn) v = std::sqrt(v);
  }
  template <typename T>
  void to_f64_t(const T* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * ldd + j] = static_cast<double>(src[r * lds + j]);
  }
  template <typename T>
  void from_f64_div_t(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div, T* dst) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = static_cast<T>(src[r * cols + j] / div[j]);
  }
  template <typename T>
  void residual_t(const T* R, const T* U, int64_t rows, int64_t cols, const std::vector<double>& theta,
                  std::vector<double>& out) {
    out.assign(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const double dd = static_cast<double>(R[r * cols + j]) - theta[j] * static_cast<double>(U[r * cols + j]);
        out[j] += dd * dd;
      }
  }
  template <typename T>
  DeltaStats fused_delta_t(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n, T* base_out,
                           T* delta) {
    return pysafe::fused_delta<T>(tuned, tdt, base, bdt, n, base_out, delta);
  }
  template <typename T>
  DeltaStats upload_delta_t(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n, T* base_out,
                            T* delta) {
    return pysafe::fused_delta<T>(tuned, tdt, base, bdt, n, base_out, delta);
  }
  bool upcasts(DType) const override { return true; }
  void synchronize_device() override {}
  template <typename T>
  void col_sums_t(const T* P, int64_t rows, int64_t cols, std::vector<double>& out) {
    out.assign(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) out[j] += static_cast<double>(P[r * cols + j]);
  }
  template <typename T>
  void prepare_rows_t(const T* P, int64_t rows, int64_t cols, bool cosine, const std::vector<double>& mu, T* X,
                      std::vector<double>& sq, std::vector<double>& inv) {
    sq.assign(static_cast<size_t>(rows), 0.0);
    inv.assign(cosine ? static_cast<size_t>(rows) : 0, 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = P + i * cols;
      T* out = X + i * cols;
      double iv = 0.0;
      if (cosine) {
        double s = 0.0;
        for (int64_t k = 0; k < cols; ++k) s += static_cast<double>(row[k]) * static_cast<double>(row[k]);
        iv = inv[i] = s > 0 ? 1.0 / std::sqrt(s) : 0.0;
      }
      double t = 0.0;
      for (int64_t k = 0; k < cols; ++k) {
        out[k] = static_cast<T>(cosine ? static_cast<double>(row[k]) * iv : static_cast<double>(row[k]) - mu[k]);
        t += static_cast<double>(out[k]) * static_cast<double>(out[k]);
      }
      sq[i] = t;
    }
  }
  template <typename T>
  int64_t epilogue_t(T* G, int64_t rows, int64_t cols, const T* sa, const T* sb, const T* ca, const T* nb,
                     bool euclid) {
    int64_t marked = 0;
    for (int64_t i = 0; i < rows; ++i) {
      T* row = G + i * cols;
      if (dist::kernel::gram_row(row, cols, sa[i], sb, ca[i], nb, euclid, true))
        for (int64_t q = 0; q < cols; ++q) marked += row[q] < T(0);
    }
    return marked;
  }

 private:
  std::atomic<size_t> held_{0}, peak_{0};
};

}  // namespace

Backend& cpu() {
  static CpuBackend be;
  return be;
}

Backend& get(int device) { return device < 0 ? cpu() : cuda(device); }

}  // namespace pysafe::backend

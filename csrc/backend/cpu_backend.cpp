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

class CpuBackend final : public Backend {
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

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
            const float* B, int64_t ldb, float beta, float* C, int64_t ldc) override {
    blas::gemm<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
            const double* B, int64_t ldb, double beta, double* C, int64_t ldc) override {
    blas::gemm<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  blas::OrthoPath orthonormalize(int64_t m, int64_t n, float* A, bool full) override { return ortho(m, n, A, full); }
  blas::OrthoPath orthonormalize(int64_t m, int64_t n, double* A, bool full) override {
    return ortho(m, n, A, full);
  }
  void gram_f64(int64_t m, int64_t n, const float* A, bool columns, std::vector<double>& G) override {
    blas::gram_f64<float>(m, n, A, columns, G);
  }
  void gram_f64(int64_t m, int64_t n, const double* A, bool columns, std::vector<double>& G) override {
    blas::gram_f64<double>(m, n, A, columns, G);
  }

  void col_norms(const float* Y, int64_t rows, int64_t cols, std::vector<double>& out) override {
    norms(Y, rows, cols, out);
  }
  void col_norms(const double* Y, int64_t rows, int64_t cols, std::vector<double>& out) override {
    norms(Y, rows, cols, out);
  }
  void to_f64(const float* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) override {
    widen(src, lds, rows, cols, dst, ldd);
  }
  void to_f64(const double* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) override {
    widen(src, lds, rows, cols, dst, ldd);
  }
  void from_f64_div(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div,
                    float* dst) override {
    narrow(src, rows, cols, div, dst);
  }
  void from_f64_div(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div,
                    double* dst) override {
    narrow(src, rows, cols, div, dst);
  }
  void residual_sumsq(const float* R, const float* U, int64_t rows, int64_t cols, const std::vector<double>& theta,
                      std::vector<double>& out) override {
    residual(R, U, rows, cols, theta, out);
  }
  void residual_sumsq(const double* R, const double* U, int64_t rows, int64_t cols,
                      const std::vector<double>& theta, std::vector<double>& out) override {
    residual(R, U, rows, cols, theta, out);
  }
  DeltaStats fused_delta(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n, float* base_out,
                         float* delta) override {
    return pysafe::fused_delta<float>(tuned, tdt, base, bdt, n, base_out, delta);
  }
  DeltaStats fused_delta(const uint8_t* tuned, DType tdt, const uint8_t* base, DType bdt, size_t n,
                         double* base_out, double* delta) override {
    return pysafe::fused_delta<double>(tuned, tdt, base, bdt, n, base_out, delta);
  }
  int64_t distance_epilogue(float* G, int64_t rows, int64_t cols, const float* sa, const float* sb, const float* ca,
                            const float* nb, bool euclid) override {
    return epilogue(G, rows, cols, sa, sb, ca, nb, euclid);
  }
  int64_t distance_epilogue(double* G, int64_t rows, int64_t cols, const double* sa, const double* sb,
                            const double* ca, const double* nb, bool euclid) override {
    return epilogue(G, rows, cols, sa, sb, ca, nb, euclid);
  }

 private:
  std::atomic<size_t> held_{0}, peak_{0};

  template <typename T>
  static blas::OrthoPath ortho(int64_t m, int64_t n, T* A, bool full) {
    return full ? blas::orthonormalize<T>(m, n, A) : blas::condition_basis<T>(m, n, A);
  }
  template <typename T>
  static void norms(const T* Y, int64_t rows, int64_t cols, std::vector<double>& nn) {
    nn.assign(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) nn[j] += static_cast<double>(Y[r * cols + j]) * Y[r * cols + j];
    for (auto& v : nn) v = std::sqrt(v);
  }
  template <typename T>
  static void widen(const T* src, int64_t lds, int64_t rows, int64_t cols, double* dst, int64_t ldd) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * ldd + j] = static_cast<double>(src[r * lds + j]);
  }
  template <typename T>
  static void narrow(const double* src, int64_t rows, int64_t cols, const std::vector<double>& div, T* dst) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = static_cast<T>(src[r * cols + j] / div[j]);
  }
  template <typename T>
  static void residual(const T* R, const T* U, int64_t rows, int64_t cols, const std::vector<double>& theta,
                       std::vector<double>& out) {
    out.assign(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const double dd = static_cast<double>(R[r * cols + j]) - theta[j] * static_cast<double>(U[r * cols + j]);
        out[j] += dd * dd;
      }
  }
  template <typename T>
  static int64_t epilogue(T* G, int64_t rows, int64_t cols, const T* sa, const T* sb, const T* ca, const T* nb,
                          bool euclid) {
    int64_t marked = 0;
    for (int64_t i = 0; i < rows; ++i) {
      T* row = G + i * cols;
      if (dist::kernel::gram_row(row, cols, sa[i], sb, ca[i], nb, euclid, true))
        for (int64_t q = 0; q < cols; ++q) marked += row[q] < T(0);
    }
    return marked;
  }
};

}  // namespace

Backend& cpu() {
  static CpuBackend be;
  return be;
}

Backend& get(int device) { return device < 0 ? cpu() : cuda(device); }

}  // namespace pysafe::backend

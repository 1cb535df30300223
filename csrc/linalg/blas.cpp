#include "linalg/blas.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>

#include "core/error.h"

namespace pysafe::blas {

void set_num_threads(int n) { scipy_openblas_set_num_threads(n); }

const char* config() { return scipy_openblas_get_config(); }

namespace {
blasint to_int(int64_t v) {
  PYSAFE_CHECK(v >= 0 && v <= INT_MAX, Value, "dim_too_large", "matrix dimension ", v,
               " exceeds the 32-bit BLAS limit of ", INT_MAX);
  return static_cast<blasint>(v);
}
}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, to_int(M),
                    to_int(N), to_int(K), alpha, A, to_int(lda), B, to_int(ldb), beta, C, to_int(ldc));
}

template <>
void gemm<double>(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                  int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  scipy_cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, to_int(M),
                    to_int(N), to_int(K), alpha, A, to_int(lda), B, to_int(ldb), beta, C, to_int(ldc));
}

template <>
void orthonormalize<float>(int64_t m, int64_t n, float* A) {
  if (n == 0) return;
  PYSAFE_ASSERT(m >= n);
  std::vector<float> tau(static_cast<size_t>(n));
  lapack_int info = scipy_LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, to_int(m), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "sgeqrf failed with info=", info);
  info = scipy_LAPACKE_sorgqr(LAPACK_ROW_MAJOR, to_int(m), to_int(n), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "sorgqr failed with info=", info);
}

template <>
void orthonormalize<double>(int64_t m, int64_t n, double* A) {
  if (n == 0) return;
  PYSAFE_ASSERT(m >= n);
  std::vector<double> tau(static_cast<size_t>(n));
  lapack_int info = scipy_LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, to_int(m), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dgeqrf failed with info=", info);
  info = scipy_LAPACKE_dorgqr(LAPACK_ROW_MAJOR, to_int(m), to_int(n), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dorgqr failed with info=", info);
}

template <>
void svd_thin<float>(int64_t m, int64_t n, float* A, std::vector<float>& U, std::vector<float>& S,
                     std::vector<float>& Vt) {
  int64_t r = std::min(m, n);
  U.assign(static_cast<size_t>(m * r), 0.f);
  S.assign(static_cast<size_t>(r), 0.f);
  Vt.assign(static_cast<size_t>(r * n), 0.f);
  if (r == 0) return;
  // Row-major A (m×n) is column-major Aᵀ (n×m) = V S Uᵀ: LAPACK's "U" is our Vt and its "VT" our U,
  // so no transposed copies are made.
  lapack_int info = scipy_LAPACKE_sgesdd(LAPACK_COL_MAJOR, 'S', to_int(n), to_int(m), A, to_int(n), S.data(),
                                         Vt.data(), to_int(n), U.data(), to_int(r));
  PYSAFE_CHECK(info == 0, Value, "lapack", "sgesdd failed to converge on a ", m, "x", n, " matrix (info=", info,
               ")");
}

template <>
void svd_thin<double>(int64_t m, int64_t n, double* A, std::vector<double>& U, std::vector<double>& S,
                      std::vector<double>& Vt) {
  int64_t r = std::min(m, n);
  U.assign(static_cast<size_t>(m * r), 0.0);
  S.assign(static_cast<size_t>(r), 0.0);
  Vt.assign(static_cast<size_t>(r * n), 0.0);
  if (r == 0) return;
  // Row-major A (m×n) is column-major Aᵀ (n×m) = V S Uᵀ: LAPACK's "U" is our Vt and its "VT" our U,
  // so no transposed copies are made.
  lapack_int info = scipy_LAPACKE_dgesdd(LAPACK_COL_MAJOR, 'S', to_int(n), to_int(m), A, to_int(n), S.data(),
                                         Vt.data(), to_int(n), U.data(), to_int(r));
  PYSAFE_CHECK(info == 0, Value, "lapack", "dgesdd failed to converge on a ", m, "x", n, " matrix (info=", info,
               ")");
}

}  // namespace pysafe::blas

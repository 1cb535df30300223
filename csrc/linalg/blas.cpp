#include "linalg/blas.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

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
void orthonormalize_householder<float>(int64_t m, int64_t n, float* A);
template <>
void orthonormalize_householder<double>(int64_t m, int64_t n, double* A);

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

namespace {

// Overloads that let the CholeskyQR code below be written once for float and double.
void syrk_t(int64_t m, int64_t n, const float* A, float* G) {  // upper(G) = AᵀA, row-major
  scipy_cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, to_int(n), to_int(m), 1.f, A, to_int(n), 0.f, G,
                    to_int(n));
}
void syrk_t(int64_t m, int64_t n, const double* A, double* G) {
  scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, to_int(n), to_int(m), 1.0, A, to_int(n), 0.0, G,
                    to_int(n));
}
// Cholesky of the n×n row-major G from its upper triangle: G = RᵀR, R upper in place. The
// row-major upper triangle is the column-major lower one, so this is Fortran potrf('L') on the
// same memory (the _work variant: no NaN check, no copy).
lapack_int potrf_upper(int64_t n, float* G) {
  return scipy_LAPACKE_spotrf_work(LAPACK_COL_MAJOR, 'L', to_int(n), G, to_int(n));
}
lapack_int potrf_upper(int64_t n, double* G) {
  return scipy_LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'L', to_int(n), G, to_int(n));
}
// R (upper, row-major) := R⁻¹ in place, the strictly lower triangle zeroed: the column-major
// lower trtri on the same memory.
lapack_int invert_upper(int64_t n, float* R) {
  for (int64_t i = 1; i < n; ++i) std::fill(R + i * n, R + i * n + i, 0.f);
  return scipy_LAPACKE_strtri_work(LAPACK_COL_MAJOR, 'L', 'N', to_int(n), R, to_int(n));
}
lapack_int invert_upper(int64_t n, double* R) {
  for (int64_t i = 1; i < n; ++i) std::fill(R + i * n, R + i * n + i, 0.0);
  return scipy_LAPACKE_dtrtri_work(LAPACK_COL_MAJOR, 'L', 'N', to_int(n), R, to_int(n));
}

// ‖G − I‖_F from the upper triangle of the symmetric G (NaN propagates).
template <typename T>
double gram_defect(int64_t n, const T* G) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double d = static_cast<double>(G[i * n + i]) - 1.0;
    s += d * d;
    for (int64_t j = i + 1; j < n; ++j) s += 2.0 * static_cast<double>(G[i * n + j]) * G[i * n + j];
  }
  return std::sqrt(s);
}

template <typename T>
bool finite_diag(int64_t n, const T* R) {
  for (int64_t i = 0; i < n; ++i)
    if (!(std::isfinite(R[i * n + i]) && R[i * n + i] > T(0))) return false;
  return true;
}

// Set once: LAPACKE's NaN checks scan every input (the engine counts non-finite values itself).
const bool kNanCheckOff = (scipy_LAPACKE_set_nancheck(0), true);

template <typename T>
OrthoPath cholqr(int64_t m, int64_t n, T* A) {
  (void)kNanCheckOff;
  // Passes 2 and 3 start from the Gram of the previous pass's output: once ‖QᵀQ − I‖_F < 0.5 there,
  // κ(Q)² <= 3 and one more CholeskyQR pass is orthonormal to working precision.
  constexpr double kGood = 0.5;
  // Q = A R⁻¹ as a GEMM with the explicit n×n inverse: OpenBLAS's trsm kernel runs at a fraction
  // of the GEMM rate on these tall, narrow panels, and the next pass (or the defect check that
  // sends the input to Householder) absorbs the inverse's extra rounding.
  std::vector<T> G(static_cast<size_t>(n * n));
  std::vector<T> saved(A, A + m * n), work(static_cast<size_t>(m * n));  // saved: for the fallback
  syrk_t(m, n, A, G.data());
  if (potrf_upper(n, G.data()) == 0 && finite_diag(n, G.data()) && invert_upper(n, G.data()) == 0) {
    gemm<T>(false, false, m, n, n, T(1), saved.data(), n, G.data(), n, T(0), A, n);
    for (int pass = 2; pass <= 3; ++pass) {
      syrk_t(m, n, A, G.data());
      const double defect = gram_defect(n, G.data());
      if (!std::isfinite(defect) || potrf_upper(n, G.data()) != 0 || !finite_diag(n, G.data()) ||
          invert_upper(n, G.data()) != 0)
        break;
      std::copy(A, A + m * n, work.begin());
      gemm<T>(false, false, m, n, n, T(1), work.data(), n, G.data(), n, T(0), A, n);
      if (defect < kGood) return pass == 2 ? OrthoPath::kCholQR2 : OrthoPath::kCholQR3;
    }
  }
  std::copy(saved.begin(), saved.end(), A);
  orthonormalize_householder<T>(m, n, A);
  return OrthoPath::kHouseholder;
}

template <typename T>
OrthoPath cholqr1(int64_t m, int64_t n, T* A) {
  (void)kNanCheckOff;
  std::vector<T> G(static_cast<size_t>(n * n));
  syrk_t(m, n, A, G.data());
  if (potrf_upper(n, G.data()) != 0 || !finite_diag(n, G.data()) || invert_upper(n, G.data()) != 0)
    return cholqr<T>(m, n, A);
  std::vector<T> work(A, A + m * n);
  gemm<T>(false, false, m, n, n, T(1), work.data(), n, G.data(), n, T(0), A, n);
  return OrthoPath::kCholQR1;
}

}  // namespace

const char* ortho_path_name(OrthoPath p) {
  switch (p) {
    case OrthoPath::kCholQR1: return "cholqr1";
    case OrthoPath::kCholQR2: return "cholqr2";
    case OrthoPath::kCholQR3: return "cholqr3";
    case OrthoPath::kHouseholder: return "householder";
  }
  return "?";
}

ScopedThreads::ScopedThreads(int n) : previous_(scipy_openblas_get_num_threads()) {
  if (n != previous_) scipy_openblas_set_num_threads(n);
}
ScopedThreads::~ScopedThreads() {
  if (scipy_openblas_get_num_threads() != previous_) scipy_openblas_set_num_threads(previous_);
}

template <>
OrthoPath orthonormalize<float>(int64_t m, int64_t n, float* A) {
  if (n == 0) return OrthoPath::kCholQR2;
  PYSAFE_ASSERT(m >= n);
  return cholqr<float>(m, n, A);
}

template <>
OrthoPath orthonormalize<double>(int64_t m, int64_t n, double* A) {
  if (n == 0) return OrthoPath::kCholQR2;
  PYSAFE_ASSERT(m >= n);
  return cholqr<double>(m, n, A);
}

template <>
OrthoPath condition_basis<float>(int64_t m, int64_t n, float* A) {
  if (n == 0) return OrthoPath::kCholQR1;
  PYSAFE_ASSERT(m >= n);
  return cholqr1<float>(m, n, A);
}

template <>
OrthoPath condition_basis<double>(int64_t m, int64_t n, double* A) {
  if (n == 0) return OrthoPath::kCholQR1;
  PYSAFE_ASSERT(m >= n);
  return cholqr1<double>(m, n, A);
}

// Row-major A (m×n) is column-major Aᵀ (n×m) = L Q̃ (LQ); Q̃ᵀ (m×n, orthonormal columns) is Q̃'s
// column-major n×m storage read row-major, so gelqf + orglq leave the basis in place.
template <>
void orthonormalize_householder<float>(int64_t m, int64_t n, float* A) {
  if (n == 0) return;
  PYSAFE_ASSERT(m >= n);
  (void)kNanCheckOff;
  std::vector<float> tau(static_cast<size_t>(n));
  lapack_int info = scipy_LAPACKE_sgelqf(LAPACK_COL_MAJOR, to_int(n), to_int(m), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "sgelqf failed with info=", info);
  info = scipy_LAPACKE_sorglq(LAPACK_COL_MAJOR, to_int(n), to_int(m), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "sorglq failed with info=", info);
}

template <>
void orthonormalize_householder<double>(int64_t m, int64_t n, double* A) {
  if (n == 0) return;
  PYSAFE_ASSERT(m >= n);
  (void)kNanCheckOff;
  std::vector<double> tau(static_cast<size_t>(n));
  lapack_int info = scipy_LAPACKE_dgelqf(LAPACK_COL_MAJOR, to_int(n), to_int(m), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dgelqf failed with info=", info);
  info = scipy_LAPACKE_dorglq(LAPACK_COL_MAJOR, to_int(n), to_int(m), to_int(n), A, to_int(n), tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dorglq failed with info=", info);
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

namespace pysafe::blas {

template <typename T>
void gram_f64(int64_t m, int64_t n, const T* A, bool columns, std::vector<double>& G) {
  const int64_t d = columns ? n : m;
  G.assign(static_cast<size_t>(d * d), 0.0);
  if (d == 0) return;
  if constexpr (std::is_same_v<T, double>) {
    // G = AᵀA: upper(G) by syrk over A (m×n); AAᵀ: the same over Aᵀ (NoTrans).
    scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, columns ? CblasTrans : CblasNoTrans, to_int(d),
                      to_int(columns ? m : n), 1.0, A, to_int(n), 0.0, G.data(), to_int(d));
  } else {
    const int64_t bs = 256;
    if (columns) {  // Σ over row blocks B (b×n): G += BᵀB
      std::vector<double> B(static_cast<size_t>(std::min(bs, m) * n));
      for (int64_t r0 = 0; r0 < m; r0 += bs) {
        const int64_t b = std::min(bs, m - r0);
        std::copy(A + r0 * n, A + (r0 + b) * n, B.begin());
        scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, to_int(n), to_int(b), 1.0, B.data(), to_int(n),
                          1.0, G.data(), to_int(n));
      }
    } else {  // Σ over column blocks C (m×b): G += CCᵀ
      std::vector<double> C(static_cast<size_t>(m * std::min(bs, n)));
      for (int64_t c0 = 0; c0 < n; c0 += bs) {
        const int64_t b = std::min(bs, n - c0);
        for (int64_t r = 0; r < m; ++r) std::copy(A + r * n + c0, A + r * n + c0 + b, C.begin() + r * b);
        scipy_cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, to_int(m), to_int(b), 1.0, C.data(), to_int(b),
                          1.0, G.data(), to_int(m));
      }
    }
  }
}

template void gram_f64<float>(int64_t, int64_t, const float*, bool, std::vector<double>&);
template void gram_f64<double>(int64_t, int64_t, const double*, bool, std::vector<double>&);

namespace detail_eig {

void tridiagonalize(int64_t n, double* G, std::vector<double>& d, std::vector<double>& e, std::vector<double>& tau) {
  d.assign(static_cast<size_t>(n), 0.0);
  e.assign(static_cast<size_t>(std::max<int64_t>(n, 1)), 0.0);
  tau.assign(static_cast<size_t>(std::max<int64_t>(n - 1, 1)), 0.0);
  // Row-major upper triangle = column-major lower triangle of the same memory.
  lapack_int info = scipy_LAPACKE_dsytrd(LAPACK_COL_MAJOR, 'L', to_int(n), G, to_int(n), d.data(), e.data(),
                                         tau.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dsytrd failed on a ", n, "x", n, " Gram matrix (info=", info, ")");
}

void tridiagonal_values(int64_t n, const std::vector<double>& d, const std::vector<double>& e,
                        std::vector<double>& w) {
  w = d;
  std::vector<double> ec(e);
  lapack_int info = scipy_LAPACKE_dsterf(to_int(n), w.data(), ec.data());
  PYSAFE_CHECK(info == 0, Value, "lapack", "dsterf failed to converge on a ", n, "x", n, " tridiagonal (info=",
               info, ")");
}

void top_vectors(int64_t n, const double* G, const std::vector<double>& d, const std::vector<double>& e,
                 const std::vector<double>& tau, int64_t il, int64_t iu, std::vector<double>& Z) {
  const int64_t k = iu - il + 1;
  std::vector<double> dc(d), ec(e), w(static_cast<size_t>(n));
  ec.resize(static_cast<size_t>(n), 0.0);
  Z.assign(static_cast<size_t>(n * k), 0.0);
  std::vector<lapack_int> isuppz(static_cast<size_t>(2 * k));
  lapack_int found = 0;
  lapack_logical tryrac = 1;
  lapack_int info = scipy_LAPACKE_dstemr(LAPACK_COL_MAJOR, 'V', 'I', to_int(n), dc.data(), ec.data(), 0.0, 0.0,
                                         to_int(il), to_int(iu), &found, w.data(), Z.data(), to_int(n), to_int(k),
                                         isuppz.data(), &tryrac);
  PYSAFE_CHECK(info == 0 && found == k, Value, "lapack", "dstemr failed on a ", n, "x", n,
               " tridiagonal (info=", info, ", found ", found, " of ", k, " eigenvectors)");
  info = scipy_LAPACKE_dormtr(LAPACK_COL_MAJOR, 'L', 'L', 'N', to_int(n), to_int(k), G, to_int(n),
                              tau.data(), Z.data(), to_int(n));
  PYSAFE_CHECK(info == 0, Value, "lapack", "dormtr failed (info=", info, ")");
}

}  // namespace detail_eig

}  // namespace pysafe::blas

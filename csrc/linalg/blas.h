// Thin typed wrappers over the BLAS/LAPACK of scipy-openblas32 (symbols prefixed `scipy_`,
// 32-bit integers). Row-major everywhere; LAPACKE transposes small matrices internally.
#pragma once

#include <cstdint>
#include <vector>

namespace pysafe::blas {

void set_num_threads(int n);
/// "OpenBLAS 0.3.x ... <core>" as reported by the library.
const char* config();

/// C = alpha * op(A) * op(B) + beta * C, row-major. op(A) is M×K, op(B) is K×N.
template <typename T>
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

/// How `orthonormalize` obtained its basis.
enum class OrthoPath { kCholQR1, kCholQR2, kCholQR3, kHouseholder };
const char* ortho_path_name(OrthoPath p);

/// Replace the m×n (m >= n) row-major matrix A by an orthonormal basis of its column space.
/// CholeskyQR2 (G = AᵀA by syrk, Cholesky, triangular solve; twice: level-3 only), with a third
/// pass when the second Gram shows ‖QᵀQ − I‖_F >= 0.5 after the first, and Householder QR
/// (`orthonormalize_householder`) when a Cholesky factorisation fails or the basis is still not
/// orthonormal (A ill-conditioned or rank-deficient beyond what CholeskyQR handles in T).
template <typename T>
OrthoPath orthonormalize(int64_t m, int64_t n, T* A);

/// One CholeskyQR pass: the same column space in a well-conditioned basis (‖QᵀQ − I‖ of order
/// κ(A)² u), for the power iterations' intermediate steps, where only the span matters (as
/// fbpca's LU steps); `orthonormalize` when the Cholesky factorisation fails.
template <typename T>
OrthoPath condition_basis(int64_t m, int64_t n, T* A);

/// The same by Householder QR (gelqf + orglq on the column-major view Aᵀ: no transposed copies).
template <typename T>
void orthonormalize_householder(int64_t m, int64_t n, T* A);

/// Sets OpenBLAS's thread count for the lifetime of the object and restores the previous one.
/// The setting is process-wide: use it only around work this thread coordinates.
class ScopedThreads {
 public:
  explicit ScopedThreads(int n);
  ~ScopedThreads();
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int previous_;
};

/// Thin SVD of the m×n row-major matrix A (destroyed): A = U diag(S) Vt with U m×r, Vt r×n,
/// r = min(m, n), S descending. Divide and conquer (gesdd).
template <typename T>
void svd_thin(int64_t m, int64_t n, T* A, std::vector<T>& U, std::vector<T>& S, std::vector<T>& Vt);

/// The Gram matrix of A (m×n row-major) in double: G = AᵀA (n×n) when `columns`, else AAᵀ (m×m).
/// Accumulated by blocks of rows (or columns) converted to double, so A in float is never copied
/// whole; only G's upper triangle (row-major) is written.
template <typename T>
void gram_f64(int64_t m, int64_t n, const T* A, bool columns, std::vector<double>& G);

/// Eigen-decomposition of the symmetric d×d matrix G (row-major upper triangle, destroyed) in two
/// steps sharing one tridiagonal reduction (dsytrd): all eigenvalues (dsterf), returned in
/// descending order in `evals`; then `choose_k(evals)` says how many top eigenvectors to compute
/// (dstemr on the tridiagonal, dormtr back). Vt (k×d row-major) holds them as rows, descending.
template <typename F>
void sym_eig_top(int64_t d, std::vector<double>& G, std::vector<double>& evals, F&& choose_k,
                 std::vector<double>& Vt, int64_t& k);

}  // namespace pysafe::blas

#include "linalg/blas_eig.inl"

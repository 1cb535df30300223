// Template body of blas::sym_eig_top (included by blas.h; the LAPACK calls live in blas.cpp).
#pragma once

#include <algorithm>
#include <vector>

namespace pysafe::blas {

namespace detail_eig {
/// dsytrd on G (lower col-major = upper row-major): d (n), e (n), tau (n−1), reflectors in G.
void tridiagonalize(int64_t n, double* G, std::vector<double>& d, std::vector<double>& e, std::vector<double>& tau);
/// All eigenvalues of the tridiagonal (d, e), ascending (dsterf; d and e are copied).
void tridiagonal_values(int64_t n, const std::vector<double>& d, const std::vector<double>& e,
                        std::vector<double>& w);
/// Eigenvectors il..iu (1-based, ascending) of the tridiagonal, back-transformed by the reflectors:
/// Z (n×(iu−il+1), column-major).
void top_vectors(int64_t n, const double* G, const std::vector<double>& d, const std::vector<double>& e,
                 const std::vector<double>& tau, int64_t il, int64_t iu, std::vector<double>& Z);
}  // namespace detail_eig

template <typename F>
void sym_eig_top(int64_t n, std::vector<double>& G, std::vector<double>& evals, F&& choose_k,
                 std::vector<double>& Vt, int64_t& k) {
  std::vector<double> d, e, tau, w;
  detail_eig::tridiagonalize(n, G.data(), d, e, tau);
  detail_eig::tridiagonal_values(n, d, e, w);
  evals.assign(w.rbegin(), w.rend());
  k = std::clamp<int64_t>(choose_k(static_cast<const std::vector<double>&>(evals)), 0, n);
  Vt.clear();
  if (k == 0) return;
  std::vector<double> Z;
  detail_eig::top_vectors(n, G.data(), d, e, tau, n - k + 1, n, Z);
  // Z's column j is the eigenvector of the (n−k+1+j)-th smallest value: row k−1−j of Vt.
  Vt.resize(static_cast<size_t>(k * n));
  for (int64_t j = 0; j < k; ++j)
    std::copy(Z.begin() + j * n, Z.begin() + (j + 1) * n, Vt.begin() + (k - 1 - j) * n);
}

}  // namespace pysafe::blas

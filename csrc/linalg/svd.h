// Truncated SVD for the engine, with an accuracy contract (docs/metrics.md): the reported top
// singular values meet a relative tolerance `tol`, or the result says which bound they reach.
// Per matrix the cheapest of three algorithms that meets it:
//   exact               LAPACK gesdd (all components) when min(m, n) <= exact_max_dim or forced;
//   gram_eig            the whole spectrum from the Gram matrix AᵀA (or AAᵀ) formed in double,
//                       one tridiagonal reduction, then only the top-k eigenvectors: used when every
//                       singular value is needed (the energy rule, spectrum-wide metrics) or when
//                       subspace iteration would cost more;
//   block_krylov        seeded randomized block Krylov with Rayleigh–Ritz, stopped by an
//                       a-posteriori residual bound that needs no gap (fixed k);
//   subspace_iteration  the same bound on a fixed number of power iterations (power_iters = q).
// Rank by a fixed k or by an energy fraction E of ‖A‖_F², which is known exactly before any SVD.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pysafe {

/// Options of one truncated SVD.
struct SvdOptions {
  int64_t rank = -1;            ///< fixed k; -1: choose k by `energy`
  double energy = 0.9;          ///< E in the energy rule (used when rank == -1)
  bool exact = false;           ///< force the exact path whatever the size
  int64_t exact_max_dim = 1024; ///< exact when min(m, n) <= this
  int64_t max_rank = -1;        ///< explicit cap on k under the energy rule; -1: none (the energy is reached)
  int64_t oversample = 10;      ///< p: extra columns of the sketch
  int64_t power_iters = -1;     ///< -1: iterate until `tol` is met; q >= 0: exactly q + 1 iterations
  uint64_t seed = 0;            ///< seed of the Gaussian test matrix (counter-based: thread-independent)
  bool residual_check = true;   ///< kept for compatibility: the error bound is always computed
  double tol = 1e-4;            ///< relative error allowed on the top-k singular values
  bool full_spectrum = false;   ///< compute all min(m, n) singular values (spectrum-wide metrics)
  int device = -1;              ///< where block_krylov and gram_eig's Gram product run: -1 CPU, N cuda:N
};

/// The top components of A (m×n, row-major) and how they were obtained.
template <typename T>
struct TruncatedSvd {
  int64_t m = 0, n = 0;
  int64_t r = 0;          ///< components computed (>= k)
  int64_t k = 0;          ///< components kept by the rank rule
  std::vector<T> U;       ///< m×r row-major
  std::vector<T> S;       ///< r, descending
  std::vector<T> Vt;      ///< r×n row-major
  std::string method;     ///< "exact", "gram_eig", "block_krylov", "subspace_iteration", "randomized" (randomized_svd), "none"
  bool full_spectrum = false;   ///< `spectrum` holds all min(m, n) singular values
  bool energy_reached = true;   ///< energy rule met (false only under an explicit max_rank cap)
  double fro2 = 0.0;            ///< ‖A‖_F² (exact, from the data)
  double rel_error = 0.0;       ///< bound on max_{i<k} |σ̂_i − σ_i| / σ̂_i (NaN: not computed)
  double tail_rel = 0.0;        ///< sqrt(1 − Σ_{i<k} σ_i² / ‖A‖_F²)
  int64_t sketch_passes = 0;    ///< subspace_iteration: Rayleigh–Ritz iterations; block_krylov: Krylov depth (blocks)
  bool tol_reached = true;      ///< rel_error <= tol
  std::vector<double> err;      ///< per kept value: bound on |σ̂_i − σ_i| (k values)
  std::vector<double> spectrum; ///< all min(m, n) singular values when full_spectrum, descending
  double spectrum_err = 0.0;    ///< bound on |σ̂_i² − σ_i²| for every value of `spectrum`
  double flops = 0.0;           ///< work done, in flops of T (double work counted twice in float)
};

/// Smallest k with Σ_{i<k} σ_i² >= energy · fro2; returns -1 when not reached in S.
template <typename T>
int64_t rank_for_energy(const std::vector<T>& S, int64_t count, double fro2, double energy);

/// Truncated SVD of A (m×n row-major, not modified). `fro2` = ‖A‖_F². `A_device`: the same matrix
/// already in the memory of o.device's backend (a GPU), read by block Krylov and gram_eig's Gram product
/// instead of uploading A; the host copy A is still read by the paths that run on the host.
template <typename T>
TruncatedSvd<T> truncated_svd(const T* A, int64_t m, int64_t n, double fro2, const SvdOptions& o,
                              const T* A_device = nullptr);

/// Exact thin SVD of A (m×n), all min(m, n) components.
template <typename T>
TruncatedSvd<T> exact_svd(const T* A, int64_t m, int64_t n);

/// Randomized SVD of A with l components (sketch size l = rank + oversample chosen by caller).
template <typename T>
TruncatedSvd<T> randomized_svd(const T* A, int64_t m, int64_t n, int64_t l, int64_t power_iters, uint64_t seed);

/// Two standard normals from a counter (seed, index): same values whatever the thread layout.
void gaussian_pair(uint64_t seed, uint64_t index, double& g0, double& g1);

}  // namespace pysafe

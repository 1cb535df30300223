// Truncated SVD for the engine: exact (LAPACK gesdd) for small matrices, seeded randomized
// (Halko–Martinsson–Tropp range finder, oversampling p, q power iterations with
// re-orthonormalisation) for large ones. Rank by a fixed k or by an energy fraction E of ‖A‖_F²,
// which is known exactly before any SVD (engine.md §4).
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
  int64_t max_rank = 256;       ///< largest k the randomized path computes (energy rule)
  int64_t oversample = 10;      ///< p: extra columns of the sketch
  int64_t power_iters = 2;      ///< q: power iterations, re-orthonormalised between them
  uint64_t seed = 0;            ///< seed of the Gaussian test matrix (counter-based: thread-independent)
  bool residual_check = true;   ///< compute rel_error (one more pass over A: A·V_k)
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
  std::string method;     ///< "exact" or "randomized"
  bool full_spectrum = false;   ///< S holds all min(m, n) singular values
  bool energy_reached = true;   ///< energy rule met within the computed components
  double fro2 = 0.0;            ///< ‖A‖_F² (exact, from the data)
  double rel_error = 0.0;       ///< a-posteriori bound: max_{i<k} ‖A v_i − σ_i u_i‖ / σ_1
  double tail_rel = 0.0;        ///< ‖A − U_k U_kᵀ A‖_F / ‖A‖_F
  int64_t sketch_passes = 0;    ///< randomized: number of sketches (energy rule may double k)
};

/// Smallest k with Σ_{i<k} σ_i² >= energy · fro2; returns -1 when not reached in S.
template <typename T>
int64_t rank_for_energy(const std::vector<T>& S, int64_t count, double fro2, double energy);

/// Truncated SVD of A (m×n row-major, not modified). `fro2` = ‖A‖_F².
template <typename T>
TruncatedSvd<T> truncated_svd(const T* A, int64_t m, int64_t n, double fro2, const SvdOptions& o);

/// Exact thin SVD of A (m×n), all min(m, n) components.
template <typename T>
TruncatedSvd<T> exact_svd(const T* A, int64_t m, int64_t n);

/// Randomized SVD of A with l components (sketch size l = rank + oversample chosen by caller).
template <typename T>
TruncatedSvd<T> randomized_svd(const T* A, int64_t m, int64_t n, int64_t l, int64_t power_iters, uint64_t seed);

/// Two standard normals from a counter (seed, index): same values whatever the thread layout.
void gaussian_pair(uint64_t seed, uint64_t index, double& g0, double& g1);

}  // namespace pysafe

// Exact blocked pairwise distances between activation sets (analyses.md part A, issue 4 point 2).
//
// Euclidean distances come from the Gram identity ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b with the products from
// GEMMs (sgemm for f32 input: the machine's fastest path; one multithreaded GEMM into the output for a
// cross-distance matrix, 512×512 tiles for the self matrix and the streaming summaries), turned into
// distances by one vectorised pass (gram_kernel.h) and made accurate by
//   1. centring both sets on their common mean (computed in f64) first: distances do not change, the
//      norms shrink to the spread of the data, and so does the cancellation;
//   2. norms in f64;
//   3. difference-first recomputation in f64 of every entry whose Gram estimate could be off by more
//      than the target relative error: ‖a−b‖² < kRecomputeFactor · √d · u · ‖a‖‖b‖ (u = unit
//      roundoff of T), which covers near-duplicate points and large common offsets.
// Cosine distance is 1 − cos = ½‖â − b̂‖² on rows normalised in f64 (no centring), so it takes the same
// path; a zero row has cosine distance 1 to everything (sklearn's convention) and 0 to itself.
// Self distances (B = A) are computed on the upper block triangle and mirrored: the matrix is exactly
// symmetric with an exactly zero diagonal.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace pysafe::dist {

enum class Metric { kEuclidean, kCosine };

/// Counters of one call, for tests and benchmarks.
struct Stats {
  int64_t entries = 0;     // distances computed (self: the upper triangle incl. diagonal blocks)
  int64_t recomputed = 0;  // of which recomputed difference-first in f64
};

/// out[i·m + j] = dist(A_i, B_j) for A n×d, B m×d (row-major). B == nullptr: B = A (self distances,
/// symmetric, zero diagonal). T is float or double; out has T's precision. device >= 0: the GEMMs and the
/// per-entry pass run on cuda:device (backend/backend.h), the rest as on the CPU.
template <typename T>
Stats pairwise(const T* A, int64_t n, const T* B, int64_t m, int64_t d, Metric metric, T* out, int device = -1);

/// pairwise() on rows already in the memory of `device`'s backend (a GPU; host memory for device < 0):
/// the centring or normalisation and the norms run there too, and only the rows of the rare entries
/// recomputed difference-first in f64 are copied to the host. The result `out` is on the host.
template <typename T>
Stats pairwise_resident(const T* A, int64_t n, const T* B, int64_t m, int64_t d, Metric metric, T* out, int device);

/// Streaming summaries of the self-distance matrix of A (n×d) without materialising it:
///   group_sum[i·g + c] = Σ_{j in group c, j ≠ i} dist(A_i, A_j)   (f64; labels in [0, g))
///   knn_idx / knn_dist [i·k + r]: the r-th nearest other point of i (ties by index), k ≤ n − 1.
/// Memory O(n·(g + k) + block²), independent of n².
template <typename T>
Stats summarize(const T* A, int64_t n, int64_t d, const int64_t* labels, int64_t g, int64_t k, Metric metric,
                double* group_sum, int64_t* knn_idx, double* knn_dist);

/// Rows [r0, r1) of the self-distance matrix, bit-identical to the same rows of `pairwise(A, n, nullptr,
/// ...)`, into out[(i − r0)·n + j]: the stripes of a matrix written to disk in chunks.
template <typename T>
Stats self_rows(const T* A, int64_t n, int64_t d, Metric metric, int64_t r0, int64_t r1, T* out);

}  // namespace pysafe::dist

#include "linalg/distance.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "backend/backend.h"
#include "core/error.h"
#include "core/parallel.h"
#include "linalg/blas.h"
#include "linalg/gram_kernel.h"

namespace pysafe::dist {
namespace {

// Block edge of the tiling: a 512×512×d GEMM runs near the sgemm peak and its tile (1 MiB in f32) stays
// in L2/L3. Self distances use a square grid so that every entry has one canonical block.
constexpr int64_t kBlock = 512;
// Target relative error of ‖a−b‖² from the Gram path (the distance's is half of it). An entry is recomputed
// difference-first in f64 when its rounding estimate 2·√d·u·‖a‖‖b‖ (the usual probabilistic bound of a
// length-d dot product, with a factor 2 of margin) exceeds kTol·‖a−b‖².
constexpr double kTol = 1e-5;

template <typename T>
struct Prepared {
  const T* orig = nullptr;       // the caller's rows
  int64_t n = 0, d = 0;
  std::vector<T> X;              // centred (Euclidean) or normalised (cosine) rows, in T
  std::vector<double> sq;        // ‖X_i‖² in f64, of the rows as stored in X
  std::vector<double> nrm;       // ‖X_i‖ (for the recompute test without a square root per entry)
  std::vector<T> sq_t, nrm_t;    // the same in T, for the vectorised per-entry pass
  bool any_zero = false;         // cosine: some row is all zeros
  std::vector<double> inv_norm;  // cosine: 1/‖orig_i‖ (0 for a zero row)
  std::vector<uint8_t> zero;     // cosine: the row is all zeros
};

/// Column means over the rows of A (and B), in f64.
template <typename T>
std::vector<double> common_mean(const T* A, int64_t n, const T* B, int64_t m, int64_t d) {
  std::vector<double> mu(static_cast<size_t>(d), 0.0);
  for (const auto& [P, r] : {std::pair<const T*, int64_t>{A, n}, std::pair<const T*, int64_t>{B, m}}) {
    if (P == nullptr) continue;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t k = 0; k < d; ++k) mu[k] += static_cast<double>(P[i * d + k]);
  }
  const double total = static_cast<double>(n + (B ? m : 0));
  if (total > 0)
    for (auto& v : mu) v /= total;
  return mu;
}

template <typename T>
Prepared<T> prepare(const T* P, int64_t n, int64_t d, Metric metric, const std::vector<double>& mu) {
  Prepared<T> p;
  p.orig = P;
  p.n = n;
  p.d = d;
  p.X.resize(static_cast<size_t>(n * d));
  p.sq.assign(static_cast<size_t>(n), 0.0);
  if (metric == Metric::kCosine) {
    p.inv_norm.assign(static_cast<size_t>(n), 0.0);
    p.zero.assign(static_cast<size_t>(n), 0);
  }
  parallel_for(static_cast<size_t>(n), 64, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const T* row = P + i * d;
      T* out = p.X.data() + i * d;
      if (metric == Metric::kEuclidean) {
        for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(static_cast<double>(row[k]) - mu[k]);
      } else {
        double s = 0;
        for (int64_t k = 0; k < d; ++k) s += static_cast<double>(row[k]) * static_cast<double>(row[k]);
        const double inv = s > 0 ? 1.0 / std::sqrt(s) : 0.0;
        p.inv_norm[i] = inv;
        p.zero[i] = s > 0 ? 0 : 1;
        for (int64_t k = 0; k < d; ++k) out[k] = static_cast<T>(static_cast<double>(row[k]) * inv);
      }
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += static_cast<double>(out[k]) * static_cast<double>(out[k]);
      p.sq[i] = s;
    }
  });
  p.nrm.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p.nrm[static_cast<size_t>(i)] = std::sqrt(p.sq[static_cast<size_t>(i)]);
  p.sq_t.assign(p.sq.begin(), p.sq.end());
  p.nrm_t.assign(p.nrm.begin(), p.nrm.end());
  if (metric == Metric::kCosine)
    for (uint8_t z : p.zero) p.any_zero = p.any_zero || z;
  return p;
}

/// ‖a − b‖² difference-first in f64 (cosine: of the rows scaled by ia, ib).
template <typename T>
double exact_rows(const T* a, double ia, const T* b, double ib, int64_t d, Metric metric) {
  double s = 0;
  for (int64_t k = 0; k < d; ++k) {
    const double t = metric == Metric::kEuclidean ? static_cast<double>(a[k]) - static_cast<double>(b[k])
                                                  : static_cast<double>(a[k]) * ia - static_cast<double>(b[k]) * ib;
    s += t * t;
  }
  return s;
}

/// ‖a−b‖² difference-first in f64 (cosine: of the normalised rows).
template <typename T>
double exact_sq(const Prepared<T>& A, int64_t i, const Prepared<T>& B, int64_t j, Metric metric) {
  const bool cosine = metric == Metric::kCosine;
  return exact_rows(A.orig + i * A.d, cosine ? A.inv_norm[i] : 0.0, B.orig + j * B.d, cosine ? B.inv_norm[j] : 0.0,
                    A.d, metric);
}

/// Row i of A against B's columns [j0, j0+bj): drow holds the Gram products on entry and the distances on
/// return. Returns the number of entries recomputed difference-first: the fused pass (kernel::gram_row,
/// vectorised) marks the rare untrustworthy entries with −1 and they are redone after it in f64.
template <typename T>
int64_t rows_from_gram(const Prepared<T>& A, int64_t i, const Prepared<T>& B, int64_t j0, int64_t bj, Metric metric,
                       bool self, T* drow) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double c = 2.0 * std::sqrt(static_cast<double>(std::max<int64_t>(A.d, 1))) * u / kTol;
  const bool euclid = metric == Metric::kEuclidean;
  const auto ii = static_cast<size_t>(i);
  int64_t redo = 0;
  if (kernel::gram_row(drow, bj, static_cast<T>(A.sq[ii]), B.sq_t.data() + j0, static_cast<T>(c * A.nrm[ii]),
                       B.nrm_t.data() + j0, euclid, A.d > 0)) {
    for (int64_t q = 0; q < bj; ++q) {  // entries the Gram estimate cannot be trusted with: difference-first in f64
      if (drow[q] < T(0)) {
        const double e = exact_sq(A, i, B, j0 + q, metric);
        drow[q] = static_cast<T>(euclid ? std::sqrt(e) : std::min(0.5 * e, 2.0));
        ++redo;
      }
    }
  }
  if (metric == Metric::kCosine && (A.any_zero || B.any_zero)) {
    for (int64_t q = 0; q < bj; ++q)
      if (A.zero[ii] || B.zero[static_cast<size_t>(j0 + q)]) drow[q] = T(1);
  }
  if (self && i >= j0 && i < j0 + bj) drow[i - j0] = T(0);
  return redo;
}

/// Distances of the block rows [i0, i0+bi) × cols [j0, j0+bj) of the self grid into the tile D (bi×bj): the
/// GEMM writes into it and the pass turns it into distances in place. `self`: A and B are the same set
/// (the diagonal i == j is exactly 0).
template <typename T>
int64_t block(const Prepared<T>& A, int64_t i0, int64_t bi, const Prepared<T>& B, int64_t j0, int64_t bj,
              Metric metric, bool self, T* D) {
  const int64_t d = A.d;
  if (d > 0)
    blas::gemm<T>(false, true, bi, bj, d, T(1), A.X.data() + i0 * d, d, B.X.data() + j0 * d, d, T(0), D, bj);
  int64_t redo = 0;
  for (int64_t r = 0; r < bi; ++r)
    redo += rows_from_gram<T>(A, i0 + r, B, j0, bj, metric, self, D + r * bj);
  return redo;
}

/// Run work(item, scratch) for item in [0, count) on num_threads() workers pulling items from a shared
/// counter; BLAS is single-threaded inside (the parallelism is across blocks). `Scratch` is per worker.
template <typename Scratch, typename Make, typename Work>
std::vector<Scratch> run_blocks(int64_t count, Make make, Work work) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), count)));
  std::vector<Scratch> scratch;
  scratch.reserve(static_cast<size_t>(nt));
  for (int t = 0; t < nt; ++t) scratch.push_back(make());
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(nt));
  auto loop = [&](int t) {
    try {
      for (int64_t it = next++; it < count; it = next++) work(it, scratch[static_cast<size_t>(t)]);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  {
    blas::ScopedThreads one(1);
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; ++t) pool.emplace_back(loop, t);
    loop(0);
    for (auto& th : pool) th.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return scratch;
}

/// The canonical blocks (I, J ≥ I) of the self grid, as (I, J) index pairs.
std::vector<std::pair<int64_t, int64_t>> upper_blocks(int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> v;
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) v.emplace_back(I, J);
  return v;
}

template <typename T>
struct Tile {
  std::vector<T> D;  // one block of the self grid
  int64_t redo = 0, entries = 0;
  Tile() : D(static_cast<size_t>(kBlock * kBlock)) {}
};

/// Where a canonical self block lies, once computed into its tile.
struct BlockExtent {
  int64_t I, J, i0, j0, bi, bj;
};

/// Compute the canonical self block (I, J) of the kBlock grid into t.D and count it.
template <typename T>
BlockExtent self_block(const Prepared<T>& P, std::pair<int64_t, int64_t> IJ, int64_t n, Metric metric, Tile<T>& t) {
  const auto [I, J] = IJ;
  const int64_t i0 = I * kBlock, j0 = J * kBlock;
  const int64_t bi = std::min(kBlock, n - i0), bj = std::min(kBlock, n - j0);
  t.redo += block<T>(P, i0, bi, P, j0, bj, metric, true, t.D.data());
  t.entries += bi * bj;
  return {I, J, i0, j0, bi, bj};
}

template <typename T>
Prepared<T> prepare_self(const T* A, int64_t n, int64_t d, Metric metric) {
  const std::vector<double> mu = metric == Metric::kEuclidean ? common_mean<T>(A, n, nullptr, 0, d)
                                                               : std::vector<double>(static_cast<size_t>(d), 0.0);
  return prepare<T>(A, n, d, metric, mu);
}

/// The GPU loop of pairwise(): per block of rows one GEMM of the prepared rows XA·XBᵀ (both in the
/// backend's memory) and the epilogue on the device, then on the host the rare entries the epilogue
/// marked, recomputed by exact(i, q) (‖a_i − b_q‖² difference-first in f64), the cosine zero rows, and
/// for self distances the upper triangle mirrored (exactly symmetric, zero diagonal).
template <typename T, typename Exact>
Stats gpu_loop(backend::Backend& be, const T* XA, const Prepared<T>& PA, const T* XB, const Prepared<T>& QB, int64_t n,
               int64_t m, int64_t d, Metric metric, bool self, T* out, Exact&& exact) {
  Stats st;
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double c = 2.0 * std::sqrt(static_cast<double>(std::max<int64_t>(d, 1))) * u / kTol;
  std::vector<T> ca(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ca[static_cast<size_t>(i)] = static_cast<T>(c * PA.nrm[static_cast<size_t>(i)]);
  const backend::HostView<T> sa(be, PA.sq_t.data(), PA.sq_t.size()), sb(be, QB.sq_t.data(), QB.sq_t.size());
  const backend::HostView<T> nb(be, QB.nrm_t.data(), QB.nrm_t.size()), cav(be, ca.data(), ca.size());
  // Rows per block: a tile of at most 256 MiB on the device.
  const int64_t br = std::max<int64_t>(1, std::min<int64_t>(n, (int64_t(256) << 20) / int64_t(sizeof(T)) /
                                                                   std::max<int64_t>(m, 1)));
  backend::Buffer<T> D(be, static_cast<size_t>(std::min(br, n) * m));
  const bool euclid = metric == Metric::kEuclidean;
  for (int64_t i0 = 0; i0 < n; i0 += br) {
    const int64_t bi = std::min(br, n - i0);
    if (d > 0) be.gemm(false, true, bi, m, d, T(1), XA + i0 * d, d, XB, d, T(0), D.data(), m);
    const int64_t marked = be.distance_epilogue(D.data(), bi, m, sa.data() + i0, sb.data(), cav.data() + i0,
                                                nb.data(), euclid);
    be.download(out + i0 * m, D.data(), static_cast<size_t>(bi * m) * sizeof(T));
    st.recomputed += marked;
    for (int64_t r = 0; r < bi && marked > 0; ++r) {
      T* row = out + (i0 + r) * m;
      for (int64_t q = 0; q < m; ++q)
        if (row[q] < T(0)) {
          const double e = exact(i0 + r, q);
          row[q] = static_cast<T>(euclid ? std::sqrt(e) : std::min(0.5 * e, 2.0));
        }
    }
  }
  if (metric == Metric::kCosine && (PA.any_zero || QB.any_zero))
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < m; ++q)
        if (PA.zero[static_cast<size_t>(i)] || QB.zero[static_cast<size_t>(q)]) out[i * m + q] = T(1);
  if (self)
    for (int64_t i = 0; i < n; ++i) {
      out[i * n + i] = T(0);
      for (int64_t j = i + 1; j < n; ++j) out[j * n + i] = out[i * n + j];
    }
  st.entries = n * m;
  return st;
}

/// pairwise() on a GPU backend from host rows: the same preparation (centring or normalisation in f64,
/// norms in f64) on the host, the prepared rows uploaded, then gpu_loop.
template <typename T>
Stats pairwise_on(backend::Backend& be, const T* A, int64_t n, const T* B, int64_t m, int64_t d, Metric metric,
                  T* out) {
  const bool self = B == nullptr;
  if (self) m = n;
  const std::vector<double> mu = metric == Metric::kEuclidean ? common_mean<T>(A, n, B, self ? 0 : m, d)
                                                               : std::vector<double>(static_cast<size_t>(d), 0.0);
  const Prepared<T> PA = prepare<T>(A, n, d, metric, mu);
  const Prepared<T> PB = self ? Prepared<T>() : prepare<T>(B, m, d, metric, mu);
  const Prepared<T>& QB = self ? PA : PB;
  const backend::HostView<T> XA(be, PA.X.data(), PA.X.size()), XB(be, QB.X.data(), QB.X.size());
  return gpu_loop<T>(be, XA.data(), PA, XB.data(), QB, n, m, d, metric, self, out,
                     [&](int64_t i, int64_t q) { return exact_sq(PA, i, QB, q, metric); });
}

/// The norms of rows prepared by the backend (sq from prepare_rows) as Prepared holds them; no host rows.
template <typename T>
Prepared<T> prepared_norms(int64_t n, int64_t d, Metric metric, std::vector<double> sq, std::vector<double> inv) {
  Prepared<T> p;
  p.n = n;
  p.d = d;
  p.sq = std::move(sq);
  p.nrm.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p.nrm[static_cast<size_t>(i)] = std::sqrt(p.sq[static_cast<size_t>(i)]);
  p.sq_t.assign(p.sq.begin(), p.sq.end());
  p.nrm_t.assign(p.nrm.begin(), p.nrm.end());
  if (metric == Metric::kCosine) {
    p.inv_norm = std::move(inv);
    p.zero.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) p.any_zero |= (p.zero[static_cast<size_t>(i)] = p.inv_norm[static_cast<size_t>(i)] == 0.0);
  }
  return p;
}

/// Rows of a matrix in the backend's memory copied to the host one at a time, when first needed (the
/// rare entries recomputed difference-first): the matrix itself never travels whole.
template <typename T>
struct RowCache {
  backend::Backend& be;
  const T* rows;
  int64_t n, d;
  std::vector<T> host;
  std::vector<uint8_t> have;
  const T* row(int64_t i) {
    if (host.empty()) {
      host.resize(static_cast<size_t>(n * d));
      have.assign(static_cast<size_t>(n), 0);
    }
    if (!have[static_cast<size_t>(i)]) {
      be.download(host.data() + i * d, rows + i * d, static_cast<size_t>(d) * sizeof(T));
      have[static_cast<size_t>(i)] = 1;
    }
    return host.data() + i * d;
  }
};

}  // namespace

template <typename T>
Stats pairwise_resident(const T* A, int64_t n, const T* B, int64_t m, int64_t d, Metric metric, T* out, int device) {
  backend::Backend& be = backend::get(device);
  for (const auto& [P, name] : {std::pair<const T*, const char*>{A, "a"}, std::pair<const T*, const char*>{B, "b"}})
    if (P != nullptr && device >= 0) {
      const int at = backend::device_of(P);
      PYSAFE_CHECK(at == device, Value, "wrong_device", name, " is ",
                   at < 0 ? std::string("not in GPU memory") : "on cuda:" + std::to_string(at), " but the distances run on ",
                   be.name());
    }
  be.synchronize_device();  // A and B may have just been written on another library's stream
  const bool self = B == nullptr;
  if (self) m = n;
  std::vector<double> mu(static_cast<size_t>(d), 0.0);
  if (metric == Metric::kEuclidean) {
    std::vector<double> sb;
    be.col_sums(A, n, d, mu);
    if (!self) be.col_sums(B, m, d, sb);
    const double total = static_cast<double>(n + (self ? 0 : m));
    for (int64_t k = 0; k < d; ++k) {
      if (!self) mu[k] += sb[k];
      if (total > 0) mu[k] /= total;
      PYSAFE_CHECK(std::isfinite(mu[k]), Value, "nonfinite", self ? "a" : "a or b",
                   " has a non-finite value (or values too large to sum) in column ", k);
    }
  }
  backend::Buffer<T> XA(be, static_cast<size_t>(n * d)), XB(be, self ? 0 : static_cast<size_t>(m * d));
  std::vector<double> sq, inv;
  const bool cosine = metric == Metric::kCosine;
  be.prepare_rows(A, n, d, cosine, mu, XA.data(), sq, inv);
  auto finite_rows = [&](const std::vector<double>& v, const char* name) {
    for (size_t i = 0; i < v.size(); ++i)
      PYSAFE_CHECK(std::isfinite(v[i]), Value, "nonfinite", name,
                   " has a non-finite value (or values too large to square) in row ", i);
  };
  finite_rows(sq, "a");
  const Prepared<T> PA = prepared_norms<T>(n, d, metric, std::move(sq), std::move(inv));
  Prepared<T> PB;
  if (!self) {
    be.prepare_rows(B, m, d, cosine, mu, XB.data(), sq, inv);
    finite_rows(sq, "b");
    PB = prepared_norms<T>(m, d, metric, std::move(sq), std::move(inv));
  }
  const Prepared<T>& QB = self ? PA : PB;
  RowCache<T> ra{be, A, n, d, {}, {}}, rb{be, self ? A : B, m, d, {}, {}};
  RowCache<T>& rq = self ? ra : rb;
  return gpu_loop<T>(be, XA.data(), PA, self ? XA.data() : XB.data(), QB, n, m, d, metric, self, out,
                     [&](int64_t i, int64_t q) {
                       const T* a = ra.row(i);
                       const T* b = rq.row(q);
                       return exact_rows(a, cosine ? PA.inv_norm[static_cast<size_t>(i)] : 0.0, b,
                                         cosine ? QB.inv_norm[static_cast<size_t>(q)] : 0.0, d, metric);
                     });
}


template <typename T>
Stats pairwise(const T* A, int64_t n, const T* B, int64_t m, int64_t d, Metric metric, T* out, int device) {
  Stats st;
  if (device >= 0) return pairwise_on<T>(backend::get(device), A, n, B, m, d, metric, out);
  if (B == nullptr) {
    Prepared<T> P = prepare_self<T>(A, n, d, metric);
    const int64_t nb = (n + kBlock - 1) / kBlock;
    const auto blocks = upper_blocks(nb);
    auto tiles = run_blocks<Tile<T>>(static_cast<int64_t>(blocks.size()), [] { return Tile<T>(); },
                                     [&](int64_t it, Tile<T>& t) {
      const auto [I, J, i0, j0, bi, bj] = self_block<T>(P, blocks[static_cast<size_t>(it)], n, metric, t);
      for (int64_t r = 0; r < bi; ++r)
        for (int64_t q = 0; q < bj; ++q) {
          if (I == J && q < r) continue;  // the diagonal block: the upper triangle, mirrored below
          const T v = static_cast<T>(t.D[r * bj + q]);
          out[(i0 + r) * n + (j0 + q)] = v;
          out[(j0 + q) * n + (i0 + r)] = v;
        }
    });
    for (const auto& t : tiles) {
      st.recomputed += t.redo;
      st.entries += t.entries;
    }
    return st;
  }
  const std::vector<double> mu = metric == Metric::kEuclidean ? common_mean<T>(A, n, B, m, d)
                                                               : std::vector<double>(static_cast<size_t>(d), 0.0);
  Prepared<T> PA = prepare<T>(A, n, d, metric, mu);
  Prepared<T> PB = prepare<T>(B, m, d, metric, mu);
  // One GEMM for the whole n×m product, written into the output itself, then one fused pass turns each row
  // into distances in place. Measured at n = m = 20,000, d = 1,024 on 2 cores (bench/README.md), this
  // runs at the rate of a plain sgemm of the same shape; GEMMs per 512×512 tile (each worker with a
  // single-threaded BLAS, the layout the self matrix and the summaries use) ran 35% slower: every tile
  // repacks its operands, and the output's page faults land between the GEMMs.
  if (d > 0) {
    blas::ScopedThreads all(num_threads());
    blas::gemm<T>(false, true, n, m, d, T(1), PA.X.data(), d, PB.X.data(), d, T(0), out, m);
  }
  std::atomic<int64_t> redo{0};
  parallel_for(static_cast<size_t>(n), 16, [&](size_t b, size_t e) {
    int64_t r = 0;
    for (size_t i = b; i < e; ++i) {
      T* row = out + static_cast<int64_t>(i) * m;
      r += rows_from_gram<T>(PA, static_cast<int64_t>(i), PB, 0, m, metric, false, row);
    }
    redo += r;
  });
  st.recomputed = redo;
  st.entries = n * m;
  return st;
}

template <typename T>
Stats self_rows(const T* A, int64_t n, int64_t d, Metric metric, int64_t r0, int64_t r1, T* out) {
  Stats st;
  Prepared<T> P = prepare_self<T>(A, n, d, metric);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t I0 = r0 / kBlock, I1 = r1 <= r0 ? I0 : (r1 - 1) / kBlock + 1;
  // every block (I, J) meeting the stripe, computed in its canonical orientation (min, max)
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t I = I0; I < I1; ++I)
    for (int64_t J = 0; J < nb; ++J) items.emplace_back(I, J);
  auto tiles = run_blocks<Tile<T>>(static_cast<int64_t>(items.size()), [] { return Tile<T>(); },
                                   [&](int64_t it, Tile<T>& t) {
    const auto [I, J] = items[static_cast<size_t>(it)];
    // the canonical block (min, max): the same computation as in pairwise(), hence bit-identical rows
    const auto [Ic, Jc, P0, Q0, bp, bq] = self_block<T>(P, {std::min(I, J), std::max(I, J)}, n, metric, t);
    (void)Ic;
    (void)Jc;
    for (int64_t r = 0; r < bp; ++r)
      for (int64_t q = 0; q < bq; ++q) {
        int64_t i = P0 + r, j = Q0 + q;
        if (I == J && q < r) continue;
        double v = t.D[r * bq + q];
        // the canonical block holds (min-block row, max-block col); place it at (i, j) or (j, i)
        for (int pass = 0; pass < 2; ++pass) {
          const int64_t row = pass == 0 ? i : j, col = pass == 0 ? j : i;
          if (row >= r0 && row < r1 && row / kBlock == I) out[(row - r0) * n + col] = static_cast<T>(v);
          if (i == j) break;
        }
      }
  });
  for (const auto& t : tiles) {
    st.recomputed += t.redo;
    st.entries += t.entries;
  }
  return st;
}

namespace {
struct Neighbour {
  double dist;
  int64_t idx;
  bool operator<(const Neighbour& o) const { return dist < o.dist || (dist == o.dist && idx < o.idx); }
};

template <typename T>
struct Acc : Tile<T> {
  std::vector<double> sums;                    // n × g
  std::vector<std::vector<Neighbour>> heaps;   // per row, a max-heap of the k best
  int64_t k = 0;
  void push(int64_t i, Neighbour nb) {
    auto& h = heaps[static_cast<size_t>(i)];
    if (static_cast<int64_t>(h.size()) < k) {
      h.push_back(nb);
      std::push_heap(h.begin(), h.end());
    } else if (k > 0 && nb < h.front()) {
      std::pop_heap(h.begin(), h.end());
      h.back() = nb;
      std::push_heap(h.begin(), h.end());
    }
  }
};
}  // namespace

template <typename T>
Stats summarize(const T* A, int64_t n, int64_t d, const int64_t* labels, int64_t g, int64_t k, Metric metric,
                double* group_sum, int64_t* knn_idx, double* knn_dist) {
  Stats st;
  Prepared<T> P = prepare_self<T>(A, n, d, metric);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const auto blocks = upper_blocks(nb);
  auto accs = run_blocks<Acc<T>>(static_cast<int64_t>(blocks.size()),
                                 [&] {
                                   Acc<T> a;
                                   a.sums.assign(static_cast<size_t>(n * g), 0.0);
                                   a.heaps.resize(static_cast<size_t>(n));
                                   a.k = k;
                                   return a;
                                 },
                                 [&](int64_t it, Acc<T>& a) {
    const auto [I, J, i0, j0, bi, bj] = self_block<T>(P, blocks[static_cast<size_t>(it)], n, metric, a);
    (void)I;
    (void)J;
    for (int64_t r = 0; r < bi; ++r)
      for (int64_t q = 0; q < bj; ++q) {
        const int64_t i = i0 + r, j = j0 + q;
        if (j <= i) continue;  // each unordered pair once (the diagonal block's upper triangle)
        const double v = a.D[r * bj + q];
        a.sums[static_cast<size_t>(i * g + labels[j])] += v;
        a.sums[static_cast<size_t>(j * g + labels[i])] += v;
        a.push(i, {v, j});
        a.push(j, {v, i});
      }
  });
  std::fill(group_sum, group_sum + n * g, 0.0);
  for (auto& a : accs) {
    st.recomputed += a.redo;
    st.entries += a.entries;
    for (int64_t x = 0; x < n * g; ++x) group_sum[x] += a.sums[static_cast<size_t>(x)];
  }
  parallel_for(static_cast<size_t>(n), 256, [&](size_t b, size_t e) {
    std::vector<Neighbour> all;
    for (size_t i = b; i < e; ++i) {
      all.clear();
      for (auto& a : accs) all.insert(all.end(), a.heaps[i].begin(), a.heaps[i].end());
      std::sort(all.begin(), all.end());
      for (int64_t r = 0; r < k; ++r) {
        knn_idx[i * k + r] = r < static_cast<int64_t>(all.size()) ? all[static_cast<size_t>(r)].idx : -1;
        knn_dist[i * k + r] = r < static_cast<int64_t>(all.size()) ? all[static_cast<size_t>(r)].dist
                                                                    : std::numeric_limits<double>::quiet_NaN();
      }
    }
  });
  return st;
}

#define PYSAFE_DIST_INSTANTIATE(T)                                                                          \
  template Stats pairwise<T>(const T*, int64_t, const T*, int64_t, int64_t, Metric, T*, int);                   \
  template Stats pairwise_resident<T>(const T*, int64_t, const T*, int64_t, int64_t, Metric, T*, int);          \
  template Stats summarize<T>(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, Metric, double*, \
                              int64_t*, double*);                                                          \
  template Stats self_rows<T>(const T*, int64_t, int64_t, Metric, int64_t, int64_t, T*);
PYSAFE_DIST_INSTANTIATE(float)
PYSAFE_DIST_INSTANTIATE(double)
#undef PYSAFE_DIST_INSTANTIATE

}  // namespace pysafe::dist

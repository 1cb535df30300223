#include "linalg/svd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>

#include "core/error.h"
#include "core/parallel.h"
#include "linalg/blas.h"

namespace pysafe {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}


// a-posteriori quantities from A V_k (one GEMM of the kept components).
template <typename T>
void posterior(const T* A, TruncatedSvd<T>& s) {
  const int64_t m = s.m, n = s.n, k = s.k;
  double kept = 0.0;
  for (int64_t i = 0; i < k; ++i) kept += static_cast<double>(s.S[i]) * s.S[i];
  s.tail_rel = s.fro2 > 0 ? std::sqrt(std::max(0.0, s.fro2 - kept) / s.fro2) : 0.0;
  if (k == 0 || s.S[0] == T(0)) {
    s.rel_error = 0.0;
    return;
  }
  // AV = A · V_k  (m×k); residual column i: AV[:, i] − σ_i U[:, i].
  std::vector<T> AV(static_cast<size_t>(m * k));
  blas::gemm<T>(false, true, m, k, n, T(1), A, n, s.Vt.data(), n, T(0), AV.data(), k);
  std::vector<double> res(static_cast<size_t>(k), 0.0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) {
      double d = static_cast<double>(AV[r * k + i]) - static_cast<double>(s.S[i]) * s.U[r * s.r + i];
      res[i] += d * d;
    }
  double worst = 0.0;
  for (auto v : res) worst = std::max(worst, std::sqrt(v));
  s.rel_error = worst / static_cast<double>(s.S[0]);
}

// Rows [0, rows) of the Gaussian test matrix Ωᵀ (rows×n, row-major) for `seed`: entry (c, j) is
// normal number c·n + j of the counter-based stream, so a wider sketch extends a narrower one and
// every matrix with the same n (and seed) shares one Ω. Kept in a small process-wide cache
// (most recently used last, about 64 MB at most): generating Ω costs more than a small matrix's
// sketch GEMM.
template <typename T>
std::shared_ptr<const std::vector<T>> gaussian_rows(uint64_t seed, int64_t n, int64_t rows) {
  struct Entry {
    uint64_t seed;
    int64_t n;
    std::shared_ptr<const std::vector<T>> data;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  constexpr size_t kBudget = size_t(64) << 20;
  const size_t want = static_cast<size_t>(rows * n);
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<const std::vector<T>> have;
  for (size_t i = 0; i < cache.size(); ++i)
    if (cache[i].seed == seed && cache[i].n == n) {
      have = cache[i].data;
      cache.erase(cache.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  if (!have || have->size() < want) {
    auto v = std::make_shared<std::vector<T>>(want);
    const size_t done = have ? have->size() & ~size_t(1) : 0;  // restart at a whole pair
    if (done) std::copy(have->begin(), have->begin() + static_cast<std::ptrdiff_t>(done), v->begin());
    T* out = v->data();
    const size_t p0 = done / 2, p1 = (want + 1) / 2;
    parallel_for(p1 - p0, 1 << 13, [&](size_t b, size_t e) {
      for (size_t i = p0 + b; i < p0 + e; ++i) {
        double g0, g1;
        gaussian_pair(seed, i, g0, g1);
        out[2 * i] = static_cast<T>(g0);
        if (2 * i + 1 < want) out[2 * i + 1] = static_cast<T>(g1);
      }
    });
    have = std::move(v);
  }
  cache.push_back({seed, n, have});
  size_t bytes = 0;
  for (auto& e : cache) bytes += e.data->size() * sizeof(T);
  while (cache.size() > 1 && bytes > kBudget) {
    bytes -= cache.front().data->size() * sizeof(T);
    cache.erase(cache.begin());
  }
  return have;
}

// Y (m×b) := Y − Q (Qᵀ Y) for Q (m×l) with orthonormal columns.
template <typename T>
void project_out(const std::vector<T>& Q, int64_t m, int64_t l, T* Y, int64_t b) {
  if (l == 0) return;
  std::vector<T> C(static_cast<size_t>(l * b));
  blas::gemm<T>(true, false, l, b, m, T(1), Q.data(), l, Y, b, T(0), C.data(), b);
  blas::gemm<T>(false, false, m, b, l, T(-1), Q.data(), l, C.data(), b, T(1), Y, b);
}

// The range finder's state, extendable by more columns (the energy rule's larger sketches reuse
// the smaller one's): Q (m×l) orthonormal, B = QᵀA (l×n).
template <typename T>
struct Sketch {
  int64_t l = 0;
  std::vector<T> Q, B;
};

// Add columns [sk.l, l_new) to the sketch: Y = (A Aᵀ)^q A Ω_new, orthonormalised after every
// product and kept orthogonal to the existing Q (block Gram–Schmidt, twice at the end).
template <typename T>
void extend_sketch(const T* A, int64_t m, int64_t n, Sketch<T>& sk, int64_t l_new, int64_t q, uint64_t seed) {
  const int64_t l0 = sk.l, b = l_new - l0;
  if (b <= 0) return;
  auto Om = gaussian_rows<T>(seed, n, l_new);
  const T* Omb = Om->data() + l0 * n;  // Ω_newᵀ, b×n
  std::vector<T> Y(static_cast<size_t>(m * b)), Z(static_cast<size_t>(n * b));
  // Intermediate steps need a well-conditioned basis of the right span, not an orthonormal one:
  // one CholeskyQR pass; the last step orthonormalises fully.
  auto step = [&](int64_t rows, T* M, bool last) {
    if (last)
      blas::orthonormalize<T>(rows, b, M);
    else
      blas::condition_basis<T>(rows, b, M);
  };
  blas::gemm<T>(false, true, m, b, n, T(1), A, n, Omb, n, T(0), Y.data(), b);
  project_out(sk.Q, m, l0, Y.data(), b);
  step(m, Y.data(), q == 0 && l0 == 0);
  for (int64_t it = 0; it < q; ++it) {
    blas::gemm<T>(true, false, n, b, m, T(1), A, n, Y.data(), b, T(0), Z.data(), b);
    step(n, Z.data(), false);
    blas::gemm<T>(false, false, m, b, n, T(1), A, n, Z.data(), b, T(0), Y.data(), b);
    project_out(sk.Q, m, l0, Y.data(), b);
    step(m, Y.data(), it == q - 1 && l0 == 0);
  }
  if (l0 > 0) {
    project_out(sk.Q, m, l0, Y.data(), b);
    blas::orthonormalize<T>(m, b, Y.data());
  }
  std::vector<T> Q(static_cast<size_t>(m * l_new));
  for (int64_t r = 0; r < m; ++r) {
    std::copy(sk.Q.begin() + r * l0, sk.Q.begin() + (r + 1) * l0, Q.begin() + r * l_new);
    std::copy(Y.begin() + r * b, Y.begin() + (r + 1) * b, Q.begin() + r * l_new + l0);
  }
  sk.Q = std::move(Q);
  sk.B.resize(static_cast<size_t>(l_new * n));
  blas::gemm<T>(true, false, b, n, m, T(1), Y.data(), b, A, n, T(0), sk.B.data() + l0 * n, n);
  sk.l = l_new;
}

// The SVD from the sketch: B = Ub S Vt (l×n), U = Q Ub.
template <typename T>
TruncatedSvd<T> svd_from_sketch(const Sketch<T>& sk, int64_t m, int64_t n) {
  const int64_t l = sk.l;
  TruncatedSvd<T> s;
  s.m = m;
  s.n = n;
  s.r = l;
  std::vector<T> B(sk.B), Ub;
  blas::svd_thin<T>(l, n, B.data(), Ub, s.S, s.Vt);  // Ub l×l
  s.U.resize(static_cast<size_t>(m * l));
  blas::gemm<T>(false, false, m, l, l, T(1), sk.Q.data(), l, Ub.data(), l, T(0), s.U.data(), l);
  s.method = "randomized";
  s.full_spectrum = (l == std::min(m, n));
  return s;
}

}  // namespace

void gaussian_pair(uint64_t seed, uint64_t index, double& g0, double& g1) {
  // Box–Muller on two counter-based uniforms, u1 in (0, 1], u2 in [0, 1).
  uint64_t a = splitmix64(seed ^ splitmix64(2 * index));
  uint64_t b = splitmix64(seed ^ splitmix64(2 * index + 1));
  double u1 = (static_cast<double>(a >> 11) + 1.0) * (1.0 / 9007199254740992.0);
  double u2 = static_cast<double>(b >> 11) * (1.0 / 9007199254740992.0);
  double r = std::sqrt(-2.0 * std::log(u1));
  g0 = r * std::cos(6.283185307179586 * u2);
  g1 = r * std::sin(6.283185307179586 * u2);
}

template <typename T>
int64_t rank_for_energy(const std::vector<T>& S, int64_t count, double fro2, double energy) {
  if (fro2 <= 0.0) return 0;
  const double target = energy * fro2;
  double acc = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    acc += static_cast<double>(S[i]) * S[i];
    // Relative slack of 1e-6 (≈ f32 rounding of Σσ² vs ‖A‖²) so that E = 1 is reachable.
    if (acc >= target * (1.0 - 1e-6)) return i + 1;
  }
  return -1;
}

template <typename T>
TruncatedSvd<T> exact_svd(const T* A, int64_t m, int64_t n) {
  TruncatedSvd<T> s;
  s.m = m;
  s.n = n;
  s.r = std::min(m, n);
  std::vector<T> work(A, A + m * n);
  blas::svd_thin<T>(m, n, work.data(), s.U, s.S, s.Vt);
  s.method = "exact";
  s.full_spectrum = true;
  return s;
}

template <typename T>
TruncatedSvd<T> randomized_svd(const T* A, int64_t m, int64_t n, int64_t l, int64_t q, uint64_t seed) {
  // Shapes: A (m×n), Ω (n×l), Y = AΩ (m×l), Z = AᵀQ (n×l), B = QᵀA (l×n).
  PYSAFE_ASSERT(l >= 1 && l <= std::min(m, n));
  Sketch<T> sk;
  extend_sketch(A, m, n, sk, l, q, seed);
  return svd_from_sketch(sk, m, n);
}

template <typename T>
TruncatedSvd<T> truncated_svd(const T* A, int64_t m, int64_t n, double fro2, const SvdOptions& o) {
  const int64_t dmin = std::min(m, n);
  TruncatedSvd<T> s;
  if (dmin == 0 || fro2 == 0.0) {  // empty or exactly zero: nothing to decompose
    s.m = m;
    s.n = n;
    s.method = "none";
    s.fro2 = fro2;
    s.full_spectrum = true;
    return s;
  }
  const bool fixed = o.rank >= 0;
  const int64_t want = fixed ? std::min(o.rank, dmin) : std::min(o.max_rank, dmin);
  const bool exact = o.exact || dmin <= o.exact_max_dim || want + o.oversample >= dmin / 2;
  if (exact) {
    s = exact_svd<T>(A, m, n);
    s.fro2 = fro2;
    if (fixed) {
      s.k = want;
    } else {
      int64_t k = rank_for_energy(s.S, s.r, fro2, o.energy);
      s.energy_reached = k >= 0;
      s.k = k >= 0 ? k : s.r;
    }
  } else if (fixed) {
    s = randomized_svd<T>(A, m, n, std::min(dmin, want + o.oversample), o.power_iters, o.seed);
    s.fro2 = fro2;
    s.k = want;
    s.sketch_passes = 1;
  } else {
    // Energy rule: sketch k = 32, 64, ... up to max_rank until Σσ² reaches E·‖A‖²; each larger
    // sketch adds columns to the previous one instead of starting over.
    int64_t K = std::min<int64_t>(32, want);
    int64_t passes = 0;
    Sketch<T> sk;
    while (true) {
      extend_sketch(A, m, n, sk, std::min(dmin, K + o.oversample), o.power_iters, o.seed);
      s = svd_from_sketch(sk, m, n);
      ++passes;
      int64_t k = rank_for_energy(s.S, std::min(K, s.r), fro2, o.energy);
      if (k >= 0) {
        s.k = k;
        break;
      }
      if (K >= want) {
        s.k = std::min(K, s.r);
        s.energy_reached = false;
        break;
      }
      K = std::min(2 * K, want);
    }
    s.fro2 = fro2;
    s.sketch_passes = passes;
  }
  if (o.residual_check) {
    posterior(A, s);
  } else {
    double kept = 0.0;
    for (int64_t i = 0; i < s.k; ++i) kept += static_cast<double>(s.S[i]) * s.S[i];
    s.tail_rel = fro2 > 0 ? std::sqrt(std::max(0.0, fro2 - kept) / fro2) : 0.0;
    s.rel_error = std::numeric_limits<double>::quiet_NaN();
  }
  return s;
}

template int64_t rank_for_energy<float>(const std::vector<float>&, int64_t, double, double);
template int64_t rank_for_energy<double>(const std::vector<double>&, int64_t, double, double);
template TruncatedSvd<float> truncated_svd<float>(const float*, int64_t, int64_t, double, const SvdOptions&);
template TruncatedSvd<double> truncated_svd<double>(const double*, int64_t, int64_t, double, const SvdOptions&);
template TruncatedSvd<float> exact_svd<float>(const float*, int64_t, int64_t);
template TruncatedSvd<double> exact_svd<double>(const double*, int64_t, int64_t);
template TruncatedSvd<float> randomized_svd<float>(const float*, int64_t, int64_t, int64_t, int64_t, uint64_t);
template TruncatedSvd<double> randomized_svd<double>(const double*, int64_t, int64_t, int64_t, int64_t, uint64_t);

}  // namespace pysafe

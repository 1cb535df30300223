#include "linalg/svd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>

#include "backend/backend.h"
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

namespace {

template <typename T>
constexpr double unit_roundoff() {
  return std::numeric_limits<T>::epsilon() / 2;
}

// The k kept by the rank rule from the full spectrum (values descending), capped by max_rank.
int64_t rank_from_spectrum(const std::vector<double>& sv, double fro2, const SvdOptions& o, bool& reached) {
  const int64_t d = static_cast<int64_t>(sv.size());
  reached = true;
  if (o.rank >= 0) return std::min(o.rank, d);
  int64_t k = rank_for_energy(sv, d, fro2, o.energy);
  if (k < 0) k = d;  // rounding of Σσ² vs ‖A‖²: every component
  if (o.max_rank >= 0 && k > o.max_rank) {
    reached = false;
    k = o.max_rank;
  }
  return k;
}

// What an error on σ̂_i is measured against: σ̂_i itself, but not below `floor`, the value under
// which the algorithm's own precision (err(σ) = tol·σ) cannot certify a relative tol: values there
// (zero singular values of a rank-deficient matrix, say) are held to the absolute tol·floor.
inline double tol_reference(double si, double floor) { return std::max(si, floor); }

// Working-precision error of a value computed in T from m×n data by GEMMs and an SVD: √(m+n)·u·σ_1
// (the typical, random-rounding size of γ_{m+n}·σ_1; LAPACK's own estimate for gesdd is u·σ_1).
template <typename T>
double working_error(int64_t m, int64_t n, double s1) {
  return std::sqrt(static_cast<double>(m + n)) * unit_roundoff<T>() * s1;
}

// Relative-error bookkeeping shared by the algorithms: rel_error = max_{i<k} err_i / σ̂_i.
template <typename T>
void finish_bounds(TruncatedSvd<T>& s, const SvdOptions& o, double floor) {
  double worst = 0.0;
  for (int64_t i = 0; i < s.k; ++i) {
    const double ref = tol_reference(static_cast<double>(s.S[i]), floor);
    worst = std::max(worst, ref > 0 ? s.err[i] / ref : 0.0);
  }
  s.rel_error = worst;
  s.tol_reached = worst <= o.tol;
  double kept = 0.0;
  for (int64_t i = 0; i < s.k; ++i) kept += static_cast<double>(s.S[i]) * s.S[i];
  s.tail_rel = s.fro2 > 0 ? std::sqrt(std::max(0.0, s.fro2 - kept) / s.fro2) : 0.0;
}

// Replace columns of X (rows×k, row-major) whose norm is below `floor` by Gaussian columns and
// orthonormalise (CholeskyQR keeps the order and, for a nearly orthonormal X, the columns).
template <typename T>
void complete_basis(std::vector<T>& X, int64_t rows, int64_t k, const std::vector<double>& norms, double floor,
                    uint64_t seed) {
  for (int64_t j = 0; j < k; ++j)
    if (!(norms[j] > floor))
      for (int64_t r = 0; r < rows; ++r) {
        double g0, g1;
        gaussian_pair(seed ^ 0x5bd1e995ull, static_cast<uint64_t>(j * rows + r), g0, g1);
        X[r * k + j] = static_cast<T>(g0);
      }
  blas::orthonormalize<T>(rows, k, X.data());
}

// Cost model in flops of T's GEMM (docs/metrics.md): double work counts twice when T is float;
// the tridiagonal reduction (half matrix–vector) runs at about a sixth of the GEMM rate.
template <typename T>
double gram_cost(int64_t m, int64_t n, int64_t k) {
  const double w = std::is_same_v<T, float> ? 2.0 : 1.0;
  const double d = static_cast<double>(std::min(m, n)), D = static_cast<double>(std::max(m, n));
  return w * (D * d * d + 8.0 * d * d * d) + 2.0 * m * n * static_cast<double>(k);
}

// The record an SVD path starts from: shape, ‖A‖_F², which algorithm, and (iterative paths) the k kept.
template <typename T>
TruncatedSvd<T> start_svd(int64_t m, int64_t n, double fro2, const char* method, int64_t k = 0) {
  TruncatedSvd<T> s;
  s.m = m;
  s.n = n;
  s.fro2 = fro2;
  s.method = method;
  s.k = k;
  return s;
}

// gram_eig: all singular values from G = AᵀA (columns side, m >= n) or AAᵀ (m < n), formed in
// double; then the top-k eigenvectors of G from the same tridiagonal reduction; the other side's
// vectors are A v_i / σ_i (resp. Aᵀ u_i / σ_i), orthonormalised.
// Error bound: the computed G = AᵀA + E with ‖E‖₂ <= γ_D ‖A‖_F² (D the summed dimension, γ_D = D·u
// in double) and the symmetric eigensolver is backward stable (another O(d·u)‖G‖₂), so
// |σ̂_i² − σ_i²| <= δ := (D + d)·u_64·‖A‖_F², hence |σ̂_i − σ_i| <= min(√δ, δ / σ̂_i).
template <typename T>
TruncatedSvd<T> gram_svd(const T* A, int64_t m, int64_t n, double fro2, const SvdOptions& o, const T* A_device) {
  TruncatedSvd<T> s = start_svd<T>(m, n, fro2, "gram_eig");
  const bool columns = m >= n;
  const int64_t d = std::min(m, n), D = std::max(m, n);
  std::vector<double> G, evals, Z;
  backend::get(o.device).gram_f64(m, n, A, columns, G, A_device);  // the one O(m·n·d) step: on the device
  int64_t k = 0;
  bool reached = true;
  blas::sym_eig_top(
      d, G, evals,
      [&](const std::vector<double>& ev) {
        s.spectrum.resize(ev.size());
        for (size_t i = 0; i < ev.size(); ++i) s.spectrum[i] = std::sqrt(std::max(0.0, ev[i]));
        return rank_from_spectrum(s.spectrum, fro2, o, reached);
      },
      Z, k);
  s.full_spectrum = true;
  s.energy_reached = reached;
  s.spectrum_err = static_cast<double>(D + d) * unit_roundoff<double>() * fro2;
  s.k = s.r = k;
  s.S.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) s.S[i] = static_cast<T>(s.spectrum[i]);
  s.err.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    const double sv = s.spectrum[i], delta = s.spectrum_err;
    // Plus the rounding of σ̂ to T when T is float.
    s.err[i] = std::min(std::sqrt(delta), sv > 0 ? delta / sv : INFINITY) + unit_roundoff<T>() * sv;
  }
  const double s1 = s.spectrum.empty() ? 0.0 : s.spectrum[0];
  const double floor = std::min(s1, 2.0 * std::sqrt(s.spectrum_err / o.tol));
  if (k > 0) {
    // Z (k×d, rows = eigenvectors, double); the other side = A·(vectors) / σ, formed in double by
    // blocks (A's rows or columns converted on the fly): orthonormal to the eigenvectors' accuracy,
    // so no re-orthonormalisation is needed except where a σ is at the noise level.
    std::vector<T> E(Z.begin(), Z.end());
    const int64_t other = columns ? m : n;
    std::vector<double> Wd(static_cast<size_t>(other * k));
    {
      const int64_t bs = 256;
      if (columns) {  // W = A V : row block (b×n) · Vᵀᵀ (n×k)
        std::vector<double> Ab(static_cast<size_t>(std::min(bs, m) * n));
        for (int64_t r0 = 0; r0 < m; r0 += bs) {
          const int64_t b = std::min(bs, m - r0);
          std::copy(A + r0 * n, A + (r0 + b) * n, Ab.begin());
          blas::gemm<double>(false, true, b, k, n, 1.0, Ab.data(), n, Z.data(), n, 0.0, Wd.data() + r0 * k, k);
        }
      } else {  // W = Aᵀ U : column block of A (m×b)ᵀ · U (m×k), U = Zᵀ
        std::vector<double> Ab(static_cast<size_t>(m * std::min(bs, n)));
        for (int64_t c0 = 0; c0 < n; c0 += bs) {
          const int64_t b = std::min(bs, n - c0);
          for (int64_t r = 0; r < m; ++r) std::copy(A + r * n + c0, A + r * n + c0 + b, Ab.begin() + r * b);
          blas::gemm<double>(true, true, b, k, m, 1.0, Ab.data(), b, Z.data(), m, 0.0, Wd.data() + c0 * k, k);
        }
      }
    }
    std::vector<double> norms(static_cast<size_t>(k));
    bool complete = false;
    for (int64_t j = 0; j < k; ++j) {
      const double sv = s.spectrum[j];
      const double inv = sv > 0 ? 1.0 / sv : 0.0;
      double nn = 0.0;
      for (int64_t r = 0; r < other; ++r) {
        Wd[r * k + j] *= inv;
        nn += Wd[r * k + j] * Wd[r * k + j];
      }
      norms[j] = sv > std::sqrt(s.spectrum_err) ? std::sqrt(nn) : 0.0;  // below the noise: no direction
      complete = complete || !(norms[j] > 0.5);
    }
    std::vector<T> W(Wd.begin(), Wd.end());
    Wd = std::vector<double>();
    if (complete) complete_basis(W, other, k, norms, 0.5, o.seed);
    if (columns) {
      s.U = std::move(W);
      s.Vt = std::move(E);
    } else {
      s.Vt.resize(static_cast<size_t>(k * n));
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < k; ++j) s.Vt[j * n + r] = W[r * k + j];
      s.U.resize(static_cast<size_t>(m * k));
      for (int64_t j = 0; j < k; ++j)
        for (int64_t r = 0; r < m; ++r) s.U[r * k + j] = E[j * m + r];
    }
  }
  finish_bounds(s, o, floor);
  s.flops = gram_cost<T>(m, n, k);
  return s;
}


// subspace_iteration: Y = AΩ; then per iteration Q = orth(Y), B = QᵀA (= (AᵀQ)ᵀ), B = U_b Σ Vᵀ
// (Rayleigh–Ritz), Y = A V. The product A V is both the next iterate and the residual
// r_i = A v_i − σ̃_i u_i (Aᵀ u_i = σ̃_i v_i holds exactly by construction), so the bound costs no
// extra pass. With η_i = ‖r_i‖ / √2, the residual of (u_i; v_i)/√2 as an eigenvector of
// [[0, A], [Aᵀ, 0]], some singular value lies within η_i of σ̃_i, and within η_i² / gap_i
// (Kato–Temple) where gap_i is the distance from σ̃_i to the other Ritz values, each widened by
// its own η (assuming, as for every Krylov/subspace method, that no singular value above σ̃_l is
// missing from the random start). Since σ̃_i <= σ_i (interlacing), err_i = min(η_i, η_i²/gap_i)
// + u·σ̃_1 (working precision). Stops when err_i <= tol·σ̃_i for i < k, or after q+1 iterations
// when power_iters = q is given, or when the iterations would cost more than gram_eig (the budget,
// or earlier when the observed per-iteration reduction of the error extrapolates past it; returns
// false then: the caller switches to gram_eig).
template <typename T>
bool subspace_iteration(const T* A, int64_t m, int64_t n, double fro2, int64_t k, const SvdOptions& o,
                        TruncatedSvd<T>& s) {
  const int64_t dmin = std::min(m, n);
  const int64_t l = std::min(dmin, k + std::max<int64_t>(o.oversample, 1));
  const bool fixed_q = o.power_iters >= 0;
  const double per_iter = 4.0 * m * n * static_cast<double>(l);
  const int64_t budget =
      fixed_q ? o.power_iters + 1
              : std::max<int64_t>(1, static_cast<int64_t>((gram_cost<T>(m, n, k) - 2.0 * m * n * l) / per_iter));
  auto Om = gaussian_rows<T>(o.seed, n, l);
  std::vector<T> Y(static_cast<size_t>(m * l)), Z(static_cast<size_t>(n * l)), B(static_cast<size_t>(l * n));
  blas::gemm<T>(false, true, m, l, n, T(1), A, n, Om->data(), n, T(0), Y.data(), l);
  s = start_svd<T>(m, n, fro2, "subspace_iteration", k);
  s.r = l;
  bool converged = false;
  int64_t it = 0;
  double floor = 0.0;
  std::vector<double> history;  // worst ratio per iteration
  std::vector<double> eta(static_cast<size_t>(l));
  while (it < budget) {
    ++it;
    std::vector<T>& Q = Y;
    blas::orthonormalize<T>(m, l, Q.data());
    blas::gemm<T>(true, false, n, l, m, T(1), A, n, Q.data(), l, T(0), Z.data(), l);  // Z = AᵀQ (n×l)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < l; ++j) B[j * n + r] = Z[r * l + j];
    std::vector<T> Ub;
    if constexpr (std::is_same_v<T, double>) {
      blas::svd_thin<T>(l, n, B.data(), Ub, s.S, s.Vt);  // B = Ub Σ Vt, Ub l×l, Vt l×n
    } else {  // the small Rayleigh–Ritz SVD in double: its rounding stays below the GEMMs'
      std::vector<double> Bd(B.begin(), B.end()), Ubd, Sd, Vtd;
      blas::svd_thin<double>(l, n, Bd.data(), Ubd, Sd, Vtd);
      Ub.assign(Ubd.begin(), Ubd.end());
      s.S.assign(Sd.begin(), Sd.end());
      s.Vt.assign(Vtd.begin(), Vtd.end());
    }
    s.U.resize(static_cast<size_t>(m * l));
    blas::gemm<T>(false, false, m, l, l, T(1), Q.data(), l, Ub.data(), l, T(0), s.U.data(), l);
    blas::gemm<T>(false, true, m, l, n, T(1), A, n, s.Vt.data(), n, T(0), Y.data(), l);  // Y = A V (next iterate)
    std::fill(eta.begin(), eta.end(), 0.0);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < l; ++j) {
        const double dd = static_cast<double>(Y[r * l + j]) - static_cast<double>(s.S[j]) * s.U[r * l + j];
        eta[j] += dd * dd;
      }
    for (auto& e : eta) e = std::sqrt(e / 2.0);
    const double s1 = static_cast<double>(s.S[0]), wp = working_error<T>(m, n, s1);
    floor = std::min(s1, 2.0 * wp / o.tol);
    s.err.assign(static_cast<size_t>(k), 0.0);
    converged = true;
    double worst = 0.0;  // max_i err_i / (tol·ref_i): converged when <= 1
    for (int64_t i = 0; i < k; ++i) {
      const double si = static_cast<double>(s.S[i]);
      double gap = si;  // distance to the eigenvalues −σ_j and 0 of the augmented matrix
      for (int64_t j = 0; j < l; ++j)
        if (j != i) gap = std::min(gap, std::abs(si - static_cast<double>(s.S[j])) - eta[j]);
      const double lin = eta[i], quad = gap > 0 ? eta[i] * eta[i] / gap : INFINITY;
      s.err[i] = std::min(lin, quad) + wp;
      const double ratio = s.err[i] / (o.tol * tol_reference(si, floor));
      worst = std::max(worst, ratio);
      if (ratio > 1.0) converged = false;
    }
    if (converged && !fixed_q) break;
    // Give up early when the observed rate of convergence says the budget will not suffice (slow
    // decay or no gap at k): the caller then pays for gram_eig once, not for both.
    // The rate is taken over the last 4 iterations (the bound is not monotone step by step: the
    // gaps it uses move with the neighbours' residuals).
    history.push_back(worst);
    if (!fixed_q && history.size() >= 5) {
      const double then = history[history.size() - 5];
      const double rate = then > 0 ? std::pow(worst / then, 0.25) : 0.0;
      if (!(rate < 1.0) || it + std::log(worst) / -std::log(rate) > static_cast<double>(budget)) break;
    }
  }
  s.sketch_passes = it;
  s.flops = 2.0 * m * n * l + static_cast<double>(it) * per_iter;
  finish_bounds(s, o, floor);
  return converged || fixed_q;
}


// block_krylov: randomized block Krylov (Musco & Musco 2015) with Rayleigh–Ritz, for a fixed k when
// power_iters is not given. Works on A' = A when m <= n, else on Aᵀ, so that the basis lives in the
// short dimension p (q the long one). Blocks of b = k + oversample columns:
//   Q_1 = orth(A'Ω), Z_j = A'ᵀQ_j, Q_{j+1} = orth(A'Z_j ⊥ Q_1..Q_j)   (full reorthogonalisation)
// so span(Q_1..Q_j) is the block Krylov space K_j(A'A'ᵀ, A'Ω). Rayleigh–Ritz: B = Q_allᵀA' (s×q),
// Bᵀ = Z_all, so BBᵀ = Z_allᵀZ_all =: G (s×s, accumulated in double as the blocks arrive); G =
// Ub Θ² Ubᵀ; u_i = Q_all ub_i, v_i = Z_all ub_i / θ_i (A'ᵀu_i = θ_i v_i up to Z's rounding).
// Certificate (the same as subspace_iteration's): r_i = A'v_i − θ_i u_i computed explicitly (one
// product with the c = k + 1 Ritz vectors: its rounding is u·√q·σ_1, not u·σ_1²/θ_i); η_i = ‖r_i‖/√2
// is the residual of (u_i; v_i)/√2 for [[0, A'], [A'ᵀ, 0]], so a singular value lies within η_i of
// θ_i with no gap needed (Weyl/Bauer–Fike for a symmetric matrix), and within η_i²/gap_i when the
// other Ritz values (widened by their η) leave a gap (Kato–Temple). θ_i <= σ_i (interlacing), so
// err_i = min(η_i, η_i²/gap_i) + √(m+n)·u·θ_1. On a flat spectrum the gap-free term certifies.
// The check (Rayleigh–Ritz + residual) runs on a schedule predicted from the observed rate; the
// method gives up (returns false: the caller runs gram_eig) when the cost spent plus the cost
// predicted exceeds what gram_eig would cost, or the basis would pass half the short dimension.
// `flops` counts the work done (double flops twice when T is float), for the cost model and the
// record (svd_flops_*).
template <typename T>
bool block_krylov(const T* A_host, int64_t m, int64_t n, double fro2, int64_t k, const SvdOptions& o,
                  TruncatedSvd<T>& s, const T* A_device) {
  // Written once against the backend's primitives (backend/backend.h): A and the bases live in the
  // backend's memory; the small Rayleigh–Ritz problem (G, s×s) and the bounds are computed on the host.
  backend::Backend& be = backend::get(o.device);
  const backend::HostView<T> Aview(be, A_host, static_cast<size_t>(m * n), A_device);
  const T* A = Aview.data();
  const bool tr = m > n;  // A' = Aᵀ
  const int64_t p = std::min(m, n), q = std::max(m, n);
  const int64_t b = std::min(p, k + std::max<int64_t>(o.oversample, 1));
  const double w = std::is_same_v<T, float> ? 2.0 : 1.0;
  const double budget = gram_cost<T>(m, n, k);
  const int64_t smax = std::max(b, std::min(p, std::max(b, p / 2)));
  s = start_svd<T>(m, n, fro2, "block_krylov", k);
  double flops = 0.0;
  // A'·X (X q×c, ld ldx) -> out p×c (ld ldo); A'ᵀ·Y (Y p×c) -> out q×c.
  auto mulA = [&](const T* X, int64_t c, int64_t ldx, T* out, int64_t ldo) {
    if (!tr)
      be.gemm(false, false, m, c, n, T(1), A, n, X, ldx, T(0), out, ldo);
    else
      be.gemm(true, false, n, c, m, T(1), A, n, X, ldx, T(0), out, ldo);
    flops += 2.0 * p * q * c;
  };
  auto mulAt = [&](const T* Y, int64_t c, int64_t ldy, T* out, int64_t ldo) {
    if (!tr)
      be.gemm(true, false, n, c, m, T(1), A, n, Y, ldy, T(0), out, ldo);
    else
      be.gemm(false, false, m, c, n, T(1), A, n, Y, ldy, T(0), out, ldo);
    flops += 2.0 * p * q * c;
  };
  backend::Buffer<T> Qall(be, static_cast<size_t>(p * smax));
  backend::Buffer<double> Zall(be, static_cast<size_t>(q * smax));
  std::vector<double> G(static_cast<size_t>(smax * smax));
  backend::Buffer<T> Y(be, static_cast<size_t>(p * b)), Z(be, static_cast<size_t>(q * b));
  {
    auto Om = gaussian_rows<T>(o.seed, q, b);  // Ωᵀ, b×q
    const backend::HostView<T> Omv(be, Om->data(), static_cast<size_t>(b * q));
    if (!tr)
      be.gemm(false, true, m, b, n, T(1), A, n, Omv.data(), n, T(0), Y.data(), b);
    else
      be.gemm(true, true, n, b, m, T(1), A, n, Omv.data(), m, T(0), Y.data(), b);
    flops += 2.0 * p * q * b;
  }
  // Y (p×bj) := Y − Q_all[:, :sc] (Q_all[:, :sc]ᵀ Y)
  auto project = [&](int64_t sc, int64_t bj) {
    if (sc == 0) return;
    backend::Buffer<T> C(be, static_cast<size_t>(sc * bj));
    be.gemm(true, false, sc, bj, p, T(1), Qall.data(), smax, Y.data(), bj, T(0), C.data(), bj);
    be.gemm(false, false, p, bj, sc, T(-1), Qall.data(), smax, C.data(), bj, T(1), Y.data(), bj);
    flops += 4.0 * p * sc * bj;
  };
  auto colnorms = [&](int64_t bj) {
    std::vector<double> nn;
    be.col_norms(Y.data(), p, bj, nn);
    return nn;
  };
  int64_t sdim = 0, level = 0, next_check = 1, refills = 0;
  double floor = 0.0, last_worst = INFINITY;
  int64_t last_level = 0;
  bool converged = false;
  std::vector<double> eta, theta;
  std::vector<double> Ub;  // c×sdim rows: top eigenvectors of G
  int64_t c = 0;
  while (true) {
    const int64_t bj = std::min(b, smax - sdim);
    if (bj <= 0) break;
    // Next block: orthogonal to the basis (twice), columns that vanish (an invariant subspace was
    // reached: exactly low rank) refilled with fresh Gaussian columns, then orthonormalised, and
    // once more projected and orthonormalised.
    if (bj < b) {  // last, narrower block: keep the first bj columns
      backend::Buffer<T> Yn(be, static_cast<size_t>(p * bj));
      be.copy2d(Yn.data(), bj, Y.data(), b, p, bj, sizeof(T));
      Y.swap(Yn);
    }
    const std::vector<double> pre = colnorms(bj);
    project(sdim, bj);
    project(sdim, bj);
    const std::vector<double> post = colnorms(bj);
    bool refill = false;
    for (int64_t j = 0; j < bj; ++j)
      if (!(post[j] > 1e-4 * pre[j]) || !(pre[j] > 0)) {
        refill = true;
        std::vector<T> col(static_cast<size_t>(p));
        for (int64_t r = 0; r < p; ++r) {
          double g0, g1;
          gaussian_pair(o.seed ^ 0x2545F4914F6CDD1Dull, static_cast<uint64_t>((refills * b + j) * p + r), g0, g1);
          col[static_cast<size_t>(r)] = static_cast<T>(g0);
        }
        const backend::HostView<T> colv(be, col.data(), col.size());
        be.copy2d(Y.data() + j, bj, colv.data(), 1, p, 1, sizeof(T));
      }
    if (refill) {
      ++refills;
      project(sdim, bj);
      project(sdim, bj);
    }
    be.orthonormalize(p, bj, Y.data(), true);
    project(sdim, bj);
    be.orthonormalize(p, bj, Y.data(), true);
    flops += 2.0 * 4.0 * p * bj * bj;
    be.copy2d(Qall.data() + sdim, smax, Y.data(), bj, p, bj, sizeof(T));
    mulAt(Y.data(), bj, bj, Z.data(), bj);
    be.to_f64(Z.data(), bj, q, bj, Zall.data() + sdim, smax);
    // G[sdim:sdim+bj, :sdim+bj] = Z_jᵀ Z_all (double), mirrored.
    {
      const int64_t s1 = sdim + bj;
      backend::Buffer<double> Gd(be, static_cast<size_t>(bj * s1));
      be.gemm(true, false, bj, s1, q, 1.0, Zall.data() + sdim, smax, Zall.data(), smax, 0.0, Gd.data(), s1);
      flops += w * 2.0 * q * bj * s1;
      const std::vector<double> Gb = Gd.to_host();
      for (int64_t i = 0; i < bj; ++i)
        for (int64_t j = 0; j < s1; ++j) {
          G[(sdim + i) * smax + j] = Gb[i * s1 + j];
          G[j * smax + sdim + i] = Gb[i * s1 + j];
        }
    }
    sdim += bj;
    ++level;
    const bool full = sdim >= smax;
    if (level >= next_check || full) {
      // Rayleigh–Ritz: eigen-decomposition of G (s×s), top c = k + 1 vectors.
      c = std::min(k + 1, sdim);
      std::vector<double> Gc(static_cast<size_t>(sdim * sdim)), lam;
      for (int64_t i = 0; i < sdim; ++i)
        std::copy(G.begin() + i * smax, G.begin() + i * smax + sdim, Gc.begin() + i * sdim);
      int64_t kk = 0;
      blas::sym_eig_top(sdim, Gc, lam, [&](const std::vector<double>&) { return c; }, Ub, kk);
      flops += w * (8.0 * sdim * sdim * sdim + 2.0 * sdim * sdim * c);
      theta.assign(static_cast<size_t>(c), 0.0);
      for (int64_t i = 0; i < c; ++i) theta[i] = std::sqrt(std::max(0.0, lam[i]));
      const double s1 = theta[0], wp = working_error<T>(m, n, s1);
      floor = std::min(s1, 2.0 * wp / o.tol);
      // V_c = Z_all Ubᵀ Θ⁻¹ (q×c, double), U_c = Q_all Ubᵀ (p×c).
      backend::Buffer<double> Vd(be, static_cast<size_t>(q * c));
      const backend::HostView<double> Ubv(be, Ub.data(), Ub.size());
      be.gemm(false, true, q, c, sdim, 1.0, Zall.data(), smax, Ubv.data(), sdim, 0.0, Vd.data(), c);
      const std::vector<T> Ubt(Ub.begin(), Ub.end());
      const backend::HostView<T> Ubtv(be, Ubt.data(), Ubt.size());
      backend::Buffer<T> Uc(be, static_cast<size_t>(p * c));
      be.gemm(false, true, p, c, sdim, T(1), Qall.data(), smax, Ubtv.data(), sdim, T(0), Uc.data(), c);
      flops += w * 2.0 * q * sdim * c + 2.0 * p * sdim * c;
      bool degenerate = false;
      for (int64_t j = 0; j < c; ++j) degenerate = degenerate || !(theta[j] > 1e-3 * floor);
      eta.assign(static_cast<size_t>(c), INFINITY);
      backend::Buffer<T> Vc(be, static_cast<size_t>(q * c)), R(be, static_cast<size_t>(p * c));
      if (!degenerate) {
        be.from_f64_div(Vd.data(), q, c, theta, Vc.data());
        mulA(Vc.data(), c, c, R.data(), c);
        be.residual_sumsq(R.data(), Uc.data(), p, c, theta, eta);
        for (auto& e : eta) e = std::sqrt(e / 2.0);
      }
      s.err.assign(static_cast<size_t>(k), INFINITY);
      double worst = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        const double si = theta[i];
        double gap = si;
        for (int64_t j = 0; j < c; ++j)
          if (j != i) gap = std::min(gap, std::abs(si - theta[j]) - eta[j]);
        const double lin = eta[i], quad = gap > 0 ? eta[i] * eta[i] / gap : INFINITY;
        s.err[i] = std::min(lin, quad) + wp;
        worst = std::max(worst, s.err[i] / (o.tol * tol_reference(si, floor)));
      }
      converged = worst <= 1.0;
      if (converged || degenerate) {
        if (converged) {
          s.r = k;
          s.S.resize(static_cast<size_t>(k));
          for (int64_t i = 0; i < k; ++i) s.S[i] = static_cast<T>(theta[i]);
          // Left and right vectors of A (m×k and k×n).
          s.U.assign(static_cast<size_t>(m * k), T(0));
          s.Vt.assign(static_cast<size_t>(k * n), T(0));
          const std::vector<T> Uch = Uc.to_host(), Vch = Vc.to_host();
          const std::vector<T>& left = tr ? Vch : Uch;   // m×c
          const std::vector<T>& right = tr ? Uch : Vch;  // n×c
          for (int64_t r = 0; r < m; ++r)
            for (int64_t j = 0; j < k; ++j) s.U[r * k + j] = left[r * c + j];
          for (int64_t j = 0; j < k; ++j)
            for (int64_t r = 0; r < n; ++r) s.Vt[j * n + r] = right[r * c + j];
        }
        break;
      }
      // Schedule the next check from the observed rate of the bound per level; give up when the
      // predicted total exceeds gram_eig's cost.
      const double per_level = 4.0 * p * q * b + 8.0 * p * sdim * b + w * 2.0 * q * b * sdim;
      double levels_left = 1.0;
      if (std::isfinite(last_worst) && last_level < level && worst < last_worst) {
        const double rate = std::pow(worst / last_worst, 1.0 / static_cast<double>(level - last_level));
        levels_left = std::max(1.0, std::log(worst) / -std::log(rate));
      } else if (std::isfinite(last_worst) && level >= 4) {
        levels_left = INFINITY;  // no progress over several levels
      }
      last_worst = worst;
      last_level = level;
      const double check_cost = w * 8.0 * std::pow(static_cast<double>(sdim + b), 3) + 2.0 * p * q * c;
      if (flops + std::min(levels_left, 1e6) * per_level + check_cost > 1.5 * budget && level >= 3) break;
      next_check = level + std::max<int64_t>(1, static_cast<int64_t>(0.6 * std::min(levels_left, 1e6)));
    }
    if (flops > budget || full) break;
    if (bj < b) break;
    mulA(Z.data(), bj, bj, Y.data(), bj);  // the next block: A'A'ᵀQ_j
  }
  s.sketch_passes = level;
  s.flops = flops;
  if (!converged) {
    s.k = k;
    return false;
  }
  finish_bounds(s, o, floor);
  return true;
}

}  // namespace

template <typename T>
TruncatedSvd<T> truncated_svd(const T* A, int64_t m, int64_t n, double fro2, const SvdOptions& o,
                              const T* A_device) {
  const int64_t dmin = std::min(m, n);
  TruncatedSvd<T> s;
  if (dmin == 0 || fro2 == 0.0) {  // empty or exactly zero: nothing to decompose
    s.m = m;
    s.n = n;
    s.method = "none";
    s.fro2 = fro2;
    s.full_spectrum = true;
    s.spectrum.assign(static_cast<size_t>(dmin), 0.0);
    return s;
  }
  const bool fixed = o.rank >= 0;
  const int64_t want = fixed ? std::min(o.rank, dmin) : -1;
  // The exact path, also where gram_eig cannot certify the tolerance (values near zero are known
  // from the Gram matrix only to about sqrt(δ); gesdd resolves them to u·σ_1).
  // Computed in double whatever T: gesdd's error in float (observed up to ~0.1·(m+n)·u·σ_1 on
  // zero singular values) would make a relative tol of 1e-4 uncertifiable below ~σ_1/10.
  auto exact = [&] {
    if constexpr (std::is_same_v<T, double>) {
      s = exact_svd<T>(A, m, n);
      s.spectrum.assign(s.S.begin(), s.S.end());
    } else {
      std::vector<double> Ad(A, A + m * n);
      TruncatedSvd<double> sd = exact_svd<double>(Ad.data(), m, n);
      s = TruncatedSvd<T>();
      s.m = m;
      s.n = n;
      s.r = sd.r;
      s.method = sd.method;
      s.full_spectrum = true;
      s.U.assign(sd.U.begin(), sd.U.end());
      s.S.assign(sd.S.begin(), sd.S.end());
      s.Vt.assign(sd.Vt.begin(), sd.Vt.end());
      s.spectrum = std::move(sd.S);
    }
    s.fro2 = fro2;
    bool reached = true;
    s.k = rank_from_spectrum(s.spectrum, fro2, o, reached);
    s.energy_reached = reached;
    // gesdd is backward stable: |σ̂_i − σ_i| <= p(m, n)·u·σ_1 with p modest (LAPACK's own estimate
    // takes p = 1; we take m + n, in double), plus the rounding of σ̂ to T.
    const double wp = static_cast<double>(m + n) * unit_roundoff<double>() * s.spectrum[0] +
                      unit_roundoff<T>() * s.spectrum[0];
    s.spectrum_err = 2.0 * wp * s.spectrum[0];
    s.err.assign(static_cast<size_t>(s.k), wp);
    finish_bounds(s, o, std::min(s.spectrum[0], 2.0 * wp / o.tol));
    {  // gesdd with vectors, in double
      const double D = static_cast<double>(std::max(m, n)), d = static_cast<double>(dmin);
      s.flops = (std::is_same_v<T, float> ? 2.0 : 1.0) * (6.0 * D * d * d + 20.0 * d * d * d);
    }
    return s;
  };
  if (o.exact || dmin <= o.exact_max_dim) return exact();
  auto gram = [&] {
    TruncatedSvd<T> g = gram_svd<T>(A, m, n, fro2, o, o.device >= 0 ? A_device : nullptr);
    return g.tol_reached ? g : exact();
  };
  // Every singular value is needed (energy rule: k is defined by the whole spectrum; or the
  // spectrum-wide metrics): gram_eig gives them all, and the top-k vectors at little extra cost.
  if (!fixed || o.full_spectrum) return gram();
  // A fixed number of power iterations asks for subspace iteration; otherwise block Krylov, which
  // needs fewer products for the same bound, and certifies flat spectra too (the gap-free bound).
  double tried = 0.0;
  if (o.power_iters >= 0) {
    if (subspace_iteration<T>(A, m, n, fro2, want, o, s)) return s;
  } else {
    if (block_krylov<T>(A, m, n, fro2, want, o, s, o.device >= 0 ? A_device : nullptr)) return s;
    tried = s.flops;
  }
  // The iteration would cost more than gram_eig to converge: gram_eig (the flops already spent count).
  TruncatedSvd<T> g = gram();
  g.flops += tried;
  return g;
}

template int64_t rank_for_energy<float>(const std::vector<float>&, int64_t, double, double);
template int64_t rank_for_energy<double>(const std::vector<double>&, int64_t, double, double);
template TruncatedSvd<float> truncated_svd<float>(const float*, int64_t, int64_t, double, const SvdOptions&,
                                                  const float*);
template TruncatedSvd<double> truncated_svd<double>(const double*, int64_t, int64_t, double, const SvdOptions&,
                                                    const double*);
template TruncatedSvd<float> exact_svd<float>(const float*, int64_t, int64_t);
template TruncatedSvd<double> exact_svd<double>(const double*, int64_t, int64_t);
template TruncatedSvd<float> randomized_svd<float>(const float*, int64_t, int64_t, int64_t, int64_t, uint64_t);
template TruncatedSvd<double> randomized_svd<double>(const double*, int64_t, int64_t, int64_t, int64_t, uint64_t);

}  // namespace pysafe

#include "linalg/metrics.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <cmath>
#include <exception>
#include <limits>
#include <thread>
#include <type_traits>

#include "backend/backend.h"
#include "core/error.h"
#include "core/parallel.h"
#include "linalg/blas.h"
#include "linalg/convert.h"

namespace pysafe {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Per-thread buffers for W_b and ΔW reused across tensors: a fresh 180 MB allocation per tensor
// costs more in page faults and zero-filling than the fused conversion itself. Grows to the
// largest tensor seen and stays there, so memory is bounded by a few tensors, not by the model.
template <typename T>
struct Workspace {
  std::unique_ptr<T[]> base, delta;
  size_t cap = 0;
  void reserve(size_t n) {
    if (n <= cap) return;
    base.reset();
    delta.reset();
    base.reset(new T[n]);  // uninitialised on purpose: fully overwritten by fused_delta
    delta.reset(new T[n]);
    cap = n;
  }
};

template <typename T>
Workspace<T>& workspace() {
  thread_local Workspace<T> ws;
  return ws;
}

// Record the NaN/Inf count; true (with a skip reason set) when the tensor must be skipped.
bool skip_nonfinite(Record& rec, const DeltaStats& st) {
  const uint64_t bad = st.nonfinite_base + st.nonfinite_tuned;
  rec.scalars["nonfinite"] = static_cast<double>(bad);
  if (bad == 0) return false;
  rec.skip_reason = detail::concat(bad, " NaN/Inf values (base: ", st.nonfinite_base, ", tuned: ",
                                   st.nonfinite_tuned, ")");
  return true;
}

// Run fa() and fb() side by side when the core has two threads or more, OpenBLAS getting half of
// them in each; one after the other otherwise. On small matrices (the 512–4096 × 512–1376 of
// most layers) one SVD per core beats two BLAS threads per call, whose pool spins between the
// many small calls; on large ones both ways reach the GEMM rate.
template <typename FA, typename FB>
void two_lanes(FA&& fa, FB&& fb) {
  const int nt = num_threads();
  if (nt < 2) {
    fa();
    fb();
    return;
  }
  blas::ScopedThreads half(std::max(1, nt / 2));
  std::exception_ptr ea, eb;
  std::thread t([&] {
    try {
      fb();
    } catch (...) {
      eb = std::current_exception();
    }
  });
  try {
    fa();
  } catch (...) {
    ea = std::current_exception();
  }
  t.join();
  if (ea) std::rethrow_exception(ea);
  if (eb) std::rethrow_exception(eb);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
// Below this null fraction, 1 − ‖PΔW‖²/‖ΔW‖² loses digits to cancellation; recompute it from
// the residual ‖ΔW − P ΔW‖² instead.
constexpr double kRefineBelow = 0.05;

template <typename T>
double sumsq(const T* p, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return s;
}

// Subtract the mean row of the *logical* matrix W (out×in) from A. Stored (out, in): subtract
// column means; stored transposed (in, out): subtract row means. Returns the new ‖A‖_F².
template <typename T>
double center_matrix(T* A, int64_t rows, int64_t cols, bool transpose) {
  if (!transpose) {
    std::vector<double> mean(static_cast<size_t>(cols), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) mean[c] += A[r * cols + c];
    for (auto& v : mean) v /= static_cast<double>(rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) A[r * cols + c] = static_cast<T>(A[r * cols + c] - mean[c]);
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0.0;
      for (int64_t c = 0; c < cols; ++c) mean += A[r * cols + c];
      mean /= static_cast<double>(cols);
      for (int64_t c = 0; c < cols; ++c) A[r * cols + c] = static_cast<T>(A[r * cols + c] - mean);
    }
  }
  return sumsq(A, static_cast<size_t>(rows * cols));
}

// ‖A − X·Y‖_F² for A rows×cols, X rows×k (ld ldx), Y k×cols (ld ldy), in row blocks.
template <typename T>
double residual_sumsq(const T* A, int64_t rows, int64_t cols, const T* X, int64_t ldx, const T* Y, int64_t ldy,
                      int64_t k) {
  const int64_t bs = 256;
  std::vector<T> tmp(static_cast<size_t>(std::min(bs, rows) * cols));
  double total = 0.0;
  for (int64_t r0 = 0; r0 < rows; r0 += bs) {
    int64_t nb = std::min(bs, rows - r0);
    std::copy(A + r0 * cols, A + (r0 + nb) * cols, tmp.begin());
    blas::gemm<T>(false, false, nb, cols, k, T(-1), X + r0 * ldx, ldx, Y, ldy, T(1), tmp.data(), cols);
    total += sumsq(tmp.data(), static_cast<size_t>(nb * cols));
  }
  return total;
}

// For each of the first kd columns u_i of Ud (dim×ld_d): ‖u_i − Ub Ubᵀ u_i‖ with Ub's first kb
// columns; also returns ‖Ubᵀ Ud‖_F² (for the principal-angle overlap).
template <typename T>
std::vector<double> sines(const T* Ub, int64_t ldb, int64_t kb, const T* Ud, int64_t ldd, int64_t kd, int64_t dim,
                          double& cos2_sum) {
  std::vector<double> out(static_cast<size_t>(kd), 1.0);
  cos2_sum = 0.0;
  if (kd == 0) return out;
  if (kb == 0) return out;
  std::vector<T> C(static_cast<size_t>(kb * kd));  // C = Ubᵀ Ud  (kb×kd)
  blas::gemm<T>(true, false, kb, kd, dim, T(1), Ub, ldb, Ud, ldd, T(0), C.data(), kd);
  cos2_sum = sumsq(C.data(), C.size());
  std::vector<T> R(static_cast<size_t>(dim * kd));  // R = Ud − Ub C  (dim×kd)
  for (int64_t r = 0; r < dim; ++r)
    for (int64_t i = 0; i < kd; ++i) R[r * kd + i] = Ud[r * ldd + i];
  blas::gemm<T>(false, false, dim, kd, kb, T(-1), Ub, ldb, C.data(), kd, T(1), R.data(), kd);
  std::vector<double> acc(static_cast<size_t>(kd), 0.0);
  for (int64_t r = 0; r < dim; ++r)
    for (int64_t i = 0; i < kd; ++i) acc[i] += static_cast<double>(R[r * kd + i]) * R[r * kd + i];
  for (int64_t i = 0; i < kd; ++i) out[i] = std::min(1.0, std::sqrt(acc[i]));
  return out;
}

template <typename T>
std::vector<double> to_double(const std::vector<T>& v, int64_t n) {
  return std::vector<double>(v.begin(), v.begin() + std::min<int64_t>(n, static_cast<int64_t>(v.size())));
}

// Columns [0, k) of a row-major rows×ld matrix, as float.
template <typename T>
Mat take_cols(const std::vector<T>& M, int64_t rows, int64_t ld, int64_t k) {
  Mat out;
  out.rows = rows;
  out.cols = k;
  out.data.resize(static_cast<size_t>(rows * k));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; ++c) out.data[r * k + c] = static_cast<float>(M[r * ld + c]);
  return out;
}

// Rows [0, k) of a row-major k×cols matrix (Vt), transposed to cols×k (V), as float.
template <typename T>
Mat take_rows_t(const std::vector<T>& Vt, int64_t cols, int64_t k) {
  Mat out;
  out.rows = cols;
  out.cols = k;
  out.data.resize(static_cast<size_t>(cols * k));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c = 0; c < cols; ++c) out.data[c * k + i] = static_cast<float>(Vt[i * cols + c]);
  return out;
}

// V = Vtᵀ's first k columns as a row-major cols×k matrix in T (for GEMMs).
template <typename T>
std::vector<T> transpose_rows(const std::vector<T>& Vt, int64_t cols, int64_t k) {
  std::vector<T> V(static_cast<size_t>(cols * k));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c = 0; c < cols; ++c) V[c * k + i] = Vt[i * cols + c];
  return V;
}

// exp(entropy) of p_i = σ_i² / Σσ_j² over the whole spectrum `sv`, and a first-order bound on its
// error when every σ_i² is known to within ±delta: ∂H/∂λ_j = −(log p_j + H) / Λ (Λ = Σλ), with
// p_j floored at delta/Λ where the logarithm's slope is unbounded.
double effective_rank(const std::vector<double>& sv, double delta, double& err) {
  err = kNaN;
  double total = 0.0;
  for (double s : sv) total += s * s;
  if (total <= 0.0) return kNaN;
  double h = 0.0;
  for (double s : sv) {
    const double p = s * s / total;
    if (p > 0.0) h -= p * std::log(p);
  }
  const double floor_p = std::max(delta / total, 1e-300);
  double slope = 0.0;
  for (double s : sv) slope += std::abs(std::log(std::max(s * s / total, floor_p)) + h);
  err = std::exp(h) * std::expm1(std::min(700.0, slope * delta / total));
  return std::exp(h);
}

// Everything computed on the stored orientation, then mapped to logical (out, in).
struct SideMetrics {
  double null_frac = kNaN, null_frac_chance = kNaN, overlap = kNaN, overlap_chance = kNaN;
  double sin_chance = kNaN;
  std::vector<double> sin_theta;
};

template <typename T>
void fill_common(Record& rec, const TruncatedSvd<T>& sd, const TruncatedSvd<T>& sb, double base_fro2,
                 double delta_fro2_raw, const SideMetrics& stored_left, const SideMetrics& stored_right,
                 const AnalyzeParams& p, int64_t rows, int64_t cols) {
  auto& s = rec.scalars;
  s["delta_fro"] = std::sqrt(delta_fro2_raw);
  s["delta_rel"] = base_fro2 > 0 ? std::sqrt(delta_fro2_raw / base_fro2) : kNaN;
  s["base_fro"] = std::sqrt(base_fro2);
  s["rank_delta"] = static_cast<double>(sd.k);
  s["rank_base"] = static_cast<double>(sb.k);
  double kept = 0.0;
  for (int64_t i = 0; i < sd.k; ++i) kept += static_cast<double>(sd.S[i]) * sd.S[i];
  s["energy_topk_delta"] = sd.fro2 > 0 ? std::min(1.0, kept / sd.fro2) : kNaN;
  s["energy_reached_delta"] = sd.energy_reached ? 1.0 : 0.0;
  s["energy_reached_base"] = sb.energy_reached ? 1.0 : 0.0;
  const double s1 = sd.k > 0 ? static_cast<double>(sd.S[0]) : (sd.spectrum.empty() ? 0.0 : sd.spectrum[0]);
  s["stable_rank_delta"] = s1 > 0 ? sd.fro2 / (s1 * s1) : kNaN;
  // err on σ_1 (relative ε) moves ‖ΔW‖²/σ_1² by a relative 2ε/(1−ε).
  const double e1 = sd.err.empty() || s1 <= 0 ? 0.0 : sd.err[0] / s1;
  s["stable_rank_delta_err"] = s1 > 0 ? s["stable_rank_delta"] * 2.0 * e1 / std::max(1e-300, 1.0 - e1) : kNaN;
  if (sd.full_spectrum && !sd.spectrum.empty()) {
    double err = kNaN;
    s["effective_rank_delta"] = effective_rank(sd.spectrum, sd.spectrum_err, err);
    s["effective_rank_delta_err"] = err;
    rec.strings["effective_rank_from"] = "full_spectrum";
    for (auto [key, e] : {std::pair<const char*, double>{"energy_rank_50_delta", 0.5},
                          {"energy_rank_90_delta", 0.9}, {"energy_rank_99_delta", 0.99}}) {
      int64_t k = rank_for_energy(sd.spectrum, static_cast<int64_t>(sd.spectrum.size()), sd.fro2, e);
      s[key] = sd.fro2 > 0 ? static_cast<double>(k < 0 ? static_cast<int64_t>(sd.spectrum.size()) : k) : kNaN;
    }
  } else {
    // Never from a truncated spectrum presented as the whole: not computed (spectrum='none').
    s["effective_rank_delta"] = kNaN;
    s["effective_rank_delta_err"] = kNaN;
    rec.strings["effective_rank_from"] = "not_computed";
    for (const char* key : {"energy_rank_50_delta", "energy_rank_90_delta", "energy_rank_99_delta"}) s[key] = kNaN;
  }
  auto method = [](const TruncatedSvd<T>& t) { return t.method; };
  s["svd_rel_error"] = sd.method == "none" ? kNaN : sd.rel_error;
  s["svd_rel_error_delta"] = s["svd_rel_error"];
  s["svd_rel_error_base"] = sb.method == "none" ? kNaN : sb.rel_error;
  s["tol"] = p.delta.tol;
  s["tol_base"] = p.base.tol;
  s["tol_reached_delta"] = sd.tol_reached ? 1.0 : 0.0;
  s["tol_reached_base"] = sb.tol_reached ? 1.0 : 0.0;
  s["svd_tail_rel"] = sd.method == "none" ? kNaN : sd.tail_rel;
  s["svd_sketch_passes"] = static_cast<double>(sd.sketch_passes);
  s["svd_iterations_delta"] = static_cast<double>(sd.sketch_passes);
  s["svd_iterations_base"] = static_cast<double>(sb.sketch_passes);
  s["svd_flops_delta"] = sd.flops;
  s["svd_flops_base"] = sb.flops;
  rec.strings["svd_method"] = method(sd);
  rec.strings["svd_method_delta"] = method(sd);
  rec.strings["svd_method_base"] = method(sb);
  if (!sd.tol_reached || !sb.tol_reached)
    rec.strings["tol_note"] = detail::concat("tolerance not reached: bound on the top singular values' relative "
                                             "error is ", sd.rel_error, " (delta, tol ", p.delta.tol, "), ",
                                             sb.rel_error, " (base, tol ", p.base.tol, ")");
  rec.arrays["sv_delta"] = sd.full_spectrum && !sd.spectrum.empty() ? sd.spectrum : to_double(sd.S, sd.k);
  rec.arrays["sv_base"] = sb.full_spectrum && !sb.spectrum.empty() ? sb.spectrum : to_double(sb.S, sb.k);

  const SideMetrics& L = p.transpose ? stored_right : stored_left;  // logical left = output side
  const SideMetrics& R = p.transpose ? stored_left : stored_right;
  s["null_frac_left"] = L.null_frac;
  s["null_frac_right"] = R.null_frac;
  s["null_frac_left_chance"] = L.null_frac_chance;
  s["null_frac_right_chance"] = R.null_frac_chance;
  s["sin_theta_left_chance"] = L.sin_chance;
  s["sin_theta_right_chance"] = R.sin_chance;
  s["overlap_left"] = L.overlap;
  s["overlap_right"] = R.overlap;
  s["overlap_left_chance"] = L.overlap_chance;
  s["overlap_right_chance"] = R.overlap_chance;
  rec.arrays["sin_theta_left"] = L.sin_theta;
  rec.arrays["sin_theta_right"] = R.sin_theta;
  s["out_features"] = static_cast<double>(p.transpose ? cols : rows);
  s["in_features"] = static_cast<double>(p.transpose ? rows : cols);

  if (p.save_vectors) {
    Mat Ud = take_cols(sd.U, rows, sd.r, sd.k), Vd = take_rows_t(sd.Vt, cols, sd.k);
    Mat Ub = take_cols(sb.U, rows, sb.r, sb.k), Vb = take_rows_t(sb.Vt, cols, sb.k);
    rec.vectors["U_delta"] = p.transpose ? Vd : Ud;
    rec.vectors["V_delta"] = p.transpose ? Ud : Vd;
    rec.vectors["U_base"] = p.transpose ? Vb : Ub;
    rec.vectors["V_base"] = p.transpose ? Ub : Vb;
  }
}

}  // namespace

double sin_theta_chance(int64_t n, int64_t k) {
  // u uniform on the unit sphere of R^n, P a fixed rank-k projector: ‖(I − P)u‖² ~ Beta((n−k)/2, k/2),
  // and E[X^{1/2}] = B(a + 1/2, b) / B(a, b) = Γ(n/2) Γ((n−k+1)/2) / (Γ((n−k)/2) Γ((n+1)/2)).
  if (n <= 0 || k < 0 || k > n) return kNaN;
  if (k == 0) return 1.0;
  if (k == n) return 0.0;
  const double a = 0.5 * static_cast<double>(n - k), nn = static_cast<double>(n);
  return std::exp(std::lgamma(0.5 * nn) + std::lgamma(a + 0.5) - std::lgamma(a) - std::lgamma(0.5 * (nn + 1.0)));
}

namespace {

template <typename T>
void chance_levels(SideMetrics& m, int64_t kb, int64_t kd, int64_t dim, double cos2_sum) {
  m.null_frac_chance = 1.0 - static_cast<double>(kb) / dim;
  m.sin_chance = sin_theta_chance(dim, kb);
  int64_t kmin = std::min(kb, kd);
  m.overlap = kmin > 0 ? cos2_sum / static_cast<double>(kmin) : kNaN;
  m.overlap_chance = kmin > 0 ? static_cast<double>(std::max(kb, kd)) / dim : kNaN;
}

// W_base's SVD reduced to what the metrics read (the k kept vectors, every computed value) and
// back. The computed and the reused (cached) paths both go through this form, so their records
// are identical bit for bit.
// The SVD's bookkeeping, field by field the same in TruncatedSvd and BaseDecomposition: one list for
// both directions, so a field added to TruncatedSvd cannot be dropped on one of them.
template <typename From, typename To>
void copy_svd_info(const From& a, To& b) {
  b.method = a.method;
  b.full_spectrum = a.full_spectrum;
  b.energy_reached = a.energy_reached;
  b.fro2 = a.fro2;
  b.rel_error = a.rel_error;
  b.tail_rel = a.tail_rel;
  b.sketch_passes = a.sketch_passes;
  b.tol_reached = a.tol_reached;
  b.err = a.err;
  b.spectrum = a.spectrum;
  b.spectrum_err = a.spectrum_err;
  b.flops = a.flops;
}

template <typename T>
BaseDecomposition to_decomposition(const TruncatedSvd<T>& s) {
  BaseDecomposition d;
  d.rows = s.m;
  d.cols = s.n;
  d.k = s.k;
  d.f64 = std::is_same<T, double>::value;
  d.S.assign(s.S.begin(), s.S.begin() + std::min<int64_t>(s.r, static_cast<int64_t>(s.S.size())));
  d.U.resize(static_cast<size_t>(s.m * s.k));
  for (int64_t r = 0; r < s.m; ++r)
    for (int64_t c = 0; c < s.k; ++c) d.U[r * s.k + c] = s.U[r * s.r + c];
  d.Vt.assign(s.Vt.begin(), s.Vt.begin() + s.k * s.n);
  copy_svd_info(s, d);
  return d;
}

// A TruncatedSvd with r = k columns (S keeps every value; the metrics read only S[0, k) of it).
template <typename T>
TruncatedSvd<T> from_decomposition(const BaseDecomposition& d) {
  TruncatedSvd<T> s;
  s.m = d.rows;
  s.n = d.cols;
  s.r = d.k;
  s.k = d.k;
  s.U.assign(d.U.begin(), d.U.end());
  s.S.assign(d.S.begin(), d.S.end());
  s.Vt.assign(d.Vt.begin(), d.Vt.end());
  copy_svd_info(d, s);
  return s;
}

// A decomposition handed in for reuse must be of this matrix, in this precision.
template <typename T>
void check_decomposition(const BaseDecomposition& d, int64_t rows, int64_t cols) {
  const bool f64 = std::is_same<T, double>::value;
  PYSAFE_CHECK(d.rows == rows && d.cols == cols, Value, "base_decomposition",
               "base decomposition is of a ", d.rows, "x", d.cols, " matrix, expected ", rows, "x", cols);
  PYSAFE_CHECK(d.f64 == f64, Value, "base_decomposition", "base decomposition was computed in ",
               d.f64 ? "f64" : "f32", ", this analysis runs in ", f64 ? "f64" : "f32");
  PYSAFE_CHECK(d.k >= 0 && d.k <= std::min(rows, cols) && static_cast<int64_t>(d.S.size()) >= d.k &&
                   static_cast<int64_t>(d.S.size()) <= std::min(rows, cols) &&
                   static_cast<int64_t>(d.U.size()) == rows * d.k && static_cast<int64_t>(d.Vt.size()) == d.k * cols,
               Value, "base_decomposition", "base decomposition has k = ", d.k, ", ", d.S.size(), " values, U of ",
               d.U.size(), " and Vt of ", d.Vt.size(), " entries: inconsistent with a ", rows, "x", cols, " matrix");
  PYSAFE_CHECK(static_cast<int64_t>(d.spectrum.size()) <= std::min(rows, cols) && d.err.size() <= d.S.size(),
               Value, "base_decomposition", "base decomposition has a spectrum of ", d.spectrum.size(),
               " values and ", d.err.size(), " error bounds: inconsistent with a ", rows, "x", cols, " matrix");
}

}  // namespace

template <typename T>
Record analyze_dense(const uint8_t* base, DType bdt, const uint8_t* tuned, DType tdt, int64_t rows, int64_t cols,
                     const AnalyzeParams& p, const BaseDecomposition* base_in, BaseDecomposition* base_out) {
  // Shapes (stored): W_b, ΔW (rows×cols). U_b (rows×kb), V_b (cols×kb), U_Δ (rows×kd), V_Δ (cols×kd).
  Record rec;
  const size_t n = static_cast<size_t>(rows * cols);
  auto t0 = std::chrono::steady_clock::now();
  Workspace<T>& ws = workspace<T>();
  ws.reserve(n);
  T* Wb = ws.base.get();
  T* dW = ws.delta.get();
  // On a GPU (and without centring, which runs on the host): the raw stored bytes go to the device
  // through the staging buffers and W_b and ΔW are formed there, so the SVDs start from device memory;
  // the host keeps a copy (downloaded) for the steps that run on the host. On the CPU: formed in place.
  const int device = p.delta.device;
  backend::Buffer<T> dev_base, dev_delta;
  DeltaStats st;
  if (device >= 0 && !p.center && backend::get(device).upcasts(tdt) && backend::get(device).upcasts(bdt)) {
    backend::Backend& be = backend::get(device);
    dev_delta = backend::Buffer<T>(be, n);
    if (!base_in) dev_base = backend::Buffer<T>(be, n);
    st = be.upload_delta(tuned, tdt, base, bdt, n, dev_base.data(), dev_delta.data());
    be.download(dW, dev_delta.data(), n * sizeof(T));
    if (!base_in) be.download(Wb, dev_base.data(), n * sizeof(T));
  } else {
    st = fused_delta<T>(tuned, tdt, base, bdt, n, Wb, dW);
  }
  rec.scalars["time_read_delta"] = seconds_since(t0);
  if (skip_nonfinite(rec, st)) return rec;
  double base_fro2 = st.sumsq_base, delta_fro2 = st.sumsq_delta;
  double base_svd_fro2 = base_fro2, delta_svd_fro2 = delta_fro2;
  if (base_in) check_decomposition<T>(*base_in, rows, cols);
  if (p.center) {
    if (!base_in) base_svd_fro2 = center_matrix(Wb, rows, cols, p.transpose);
    delta_svd_fro2 = center_matrix(dW, rows, cols, p.transpose);
  }
  SvdOptions od = p.delta, ob = p.base;
  ob.residual_check = false;  // the record's svd_rel_error is ΔW's; skip a pass over W_b
  // The two SVDs are independent: side by side (their times overlap when they do).
  TruncatedSvd<T> sd, sb;
  BaseDecomposition computed;
  double time_svd_base = 0.0;  // written by the second lane: the record's map is the first lane's
  if (base_in) {
    // W_base's SVD reused: only ΔW's, with the BLAS threads of its lane in two_lanes. Blocked
    // reductions depend on the thread count, so this keeps the record identical bit for bit.
    std::unique_ptr<blas::ScopedThreads> lane;
    if (num_threads() >= 2) lane.reset(new blas::ScopedThreads(std::max(1, num_threads() / 2)));
    auto t = std::chrono::steady_clock::now();
    sd = truncated_svd<T>(dW, rows, cols, delta_svd_fro2, od, dev_delta.data());
    rec.scalars["time_svd_delta"] = seconds_since(t);
  } else {
    two_lanes(
        [&] {
          auto t = std::chrono::steady_clock::now();
          sd = truncated_svd<T>(dW, rows, cols, delta_svd_fro2, od, dev_delta.data());
          rec.scalars["time_svd_delta"] = seconds_since(t);
        },
        [&] {
          auto t = std::chrono::steady_clock::now();
          sb = truncated_svd<T>(Wb, rows, cols, base_svd_fro2, ob, ob.device == device ? dev_base.data() : nullptr);
          time_svd_base = seconds_since(t);
        });
  }
  rec.scalars["time_svd_base"] = time_svd_base;
  dev_delta = backend::Buffer<T>();  // the metrics below run on the host: the GPU copies are done with
  dev_base = backend::Buffer<T>();
  if (!base_in) computed = to_decomposition(sb);
  const BaseDecomposition& bd = base_in ? *base_in : computed;
  sb = from_decomposition<T>(bd);
  t0 = std::chrono::steady_clock::now();
  const int64_t kb = sb.k, kd = sd.k;

  SideMetrics left, right;
  if (delta_svd_fro2 > 0) {
    // The left and right sides are independent too.
    two_lanes(
        [&] {
          // Left (stored rows): x = ‖U_bᵀ ΔW‖² / ‖ΔW‖²  (P = U_bᵀ ΔW, kb×cols).
          std::vector<T> P(static_cast<size_t>(kb * cols));
          double x = 0.0;
          if (kb > 0) {
            blas::gemm<T>(true, false, kb, cols, rows, T(1), sb.U.data(), sb.r, dW, cols, T(0), P.data(), cols);
            x = sumsq(P.data(), P.size()) / delta_svd_fro2;
          }
          left.null_frac = std::clamp(1.0 - x, 0.0, 1.0);
          if (kb > 0 && left.null_frac < kRefineBelow)
            left.null_frac = std::clamp(
                residual_sumsq(dW, rows, cols, sb.U.data(), sb.r, P.data(), cols, kb) / delta_svd_fro2, 0.0, 1.0);
          // Principal angles between the kept singular subspaces.
          double c2l = 0.0;
          left.sin_theta = sines(sb.U.data(), sb.r, kb, sd.U.data(), sd.r, kd, rows, c2l);
          chance_levels<T>(left, kb, kd, rows, c2l);
        },
        [&] {
          // Right (stored cols): x = ‖ΔW V_b‖² / ‖ΔW‖²  (Q = ΔW V_b, rows×kb).
          std::vector<T> Q(static_cast<size_t>(rows * kb));
          double x = 0.0;
          if (kb > 0) {
            blas::gemm<T>(false, true, rows, kb, cols, T(1), dW, cols, sb.Vt.data(), cols, T(0), Q.data(), kb);
            x = sumsq(Q.data(), Q.size()) / delta_svd_fro2;
          }
          right.null_frac = std::clamp(1.0 - x, 0.0, 1.0);
          if (kb > 0 && right.null_frac < kRefineBelow)
            right.null_frac = std::clamp(
                residual_sumsq(dW, rows, cols, Q.data(), kb, sb.Vt.data(), cols, kb) / delta_svd_fro2, 0.0, 1.0);
          double c2r = 0.0;
          std::vector<T> Vb = transpose_rows(sb.Vt, cols, kb), Vd = transpose_rows(sd.Vt, cols, kd);
          right.sin_theta = sines(Vb.data(), kb, kb, Vd.data(), kd, kd, cols, c2r);
          chance_levels<T>(right, kb, kd, cols, c2r);
        });
  } else {
    rec.strings["note"] = "delta is exactly zero: subspace metrics undefined";
    chance_levels<T>(left, kb, 0, rows, 0.0);
    chance_levels<T>(right, kb, 0, cols, 0.0);
  }
  rec.scalars["time_metrics"] = seconds_since(t0);
  fill_common(rec, sd, sb, base_fro2, delta_fro2, left, right, p, rows, cols);
  if (base_out) *base_out = base_in ? *base_in : std::move(computed);
  return rec;
}

template <typename T>
Record analyze_factored(const uint8_t* base, DType bdt, int64_t rows, int64_t cols, const T* Lf, const T* Rf,
                        int64_t r, const AnalyzeParams& p, const BaseDecomposition* base_in,
                        BaseDecomposition* base_out) {
  // Stored ΔW = L R, L (rows×r), R (r×cols). With L = U_L S_L Vt_L and M = S_L Vt_L R (r×cols) = Um Sm Vtm:
  // ΔW = (U_L Um) Sm Vtm exactly, a rank-r SVD obtained from two thin SVDs.
  Record rec;
  const size_t n = static_cast<size_t>(rows * cols);
  std::vector<T> Wb(n);
  uint64_t bad = upcast<T>(base, bdt, n, Wb.data());
  std::vector<T> L(Lf, Lf + rows * r), R(Rf, Rf + r * cols);
  uint64_t bad_f = 0;
  for (auto v : L) bad_f += !std::isfinite(v);
  for (auto v : R) bad_f += !std::isfinite(v);
  rec.scalars["nonfinite"] = static_cast<double>(bad + bad_f);
  if (bad + bad_f > 0) {
    rec.skip_reason = detail::concat(bad + bad_f, " NaN/Inf values (base: ", bad, ", adapter factors: ", bad_f, ")");
    return rec;
  }
  double base_fro2 = sumsq(Wb.data(), n), base_svd_fro2 = base_fro2;
  if (base_in) check_decomposition<T>(*base_in, rows, cols);
  if (p.center) {
    if (!base_in) base_svd_fro2 = center_matrix(Wb.data(), rows, cols, p.transpose);
    if (!p.transpose) {  // ΔW − 1·meanᵀ = (L − 1·l̄ᵀ) R
      for (int64_t j = 0; j < r; ++j) {
        double m = 0.0;
        for (int64_t i = 0; i < rows; ++i) m += L[i * r + j];
        m /= static_cast<double>(rows);
        for (int64_t i = 0; i < rows; ++i) L[i * r + j] = static_cast<T>(L[i * r + j] - m);
      }
    } else {  // ΔW − (ΔW 1/cols) 1ᵀ = L (R − r̄ 1ᵀ)
      for (int64_t j = 0; j < r; ++j) {
        double m = 0.0;
        for (int64_t c = 0; c < cols; ++c) m += R[j * cols + c];
        m /= static_cast<double>(cols);
        for (int64_t c = 0; c < cols; ++c) R[j * cols + c] = static_cast<T>(R[j * cols + c] - m);
      }
    }
  }
  TruncatedSvd<T> sd;
  sd.m = rows;
  sd.n = cols;
  sd.method = "factored";
  sd.full_spectrum = true;
  {
    std::vector<T> UL, SL, VtL;
    std::vector<T> Lc(L);
    blas::svd_thin<T>(rows, r, Lc.data(), UL, SL, VtL);  // UL rows×rl, VtL rl×r, rl = min(rows, r)
    const int64_t rl = std::min(rows, r);
    std::vector<T> SVt(static_cast<size_t>(rl * r));
    for (int64_t i = 0; i < rl; ++i)
      for (int64_t j = 0; j < r; ++j) SVt[i * r + j] = SL[i] * VtL[i * r + j];
    std::vector<T> M(static_cast<size_t>(rl * cols));
    blas::gemm<T>(false, false, rl, cols, r, T(1), SVt.data(), r, R.data(), cols, T(0), M.data(), cols);
    std::vector<T> Um, Sm, Vtm;
    blas::svd_thin<T>(rl, cols, M.data(), Um, Sm, Vtm);  // Um rl×rm, rm = min(rl, cols)
    const int64_t rm = std::min(rl, cols);
    sd.r = rm;
    sd.S = Sm;
    sd.Vt = Vtm;
    sd.U.resize(static_cast<size_t>(rows * rm));
    blas::gemm<T>(false, false, rows, rm, rl, T(1), UL.data(), rl, Um.data(), rm, T(0), sd.U.data(), rm);
  }
  double delta_fro2 = 0.0;
  for (int64_t i = 0; i < sd.r; ++i) delta_fro2 += static_cast<double>(sd.S[i]) * sd.S[i];
  sd.fro2 = delta_fro2;
  if (p.delta.rank >= 0) {
    sd.k = std::min<int64_t>(p.delta.rank, sd.r);
  } else {
    int64_t k = rank_for_energy(sd.S, sd.r, delta_fro2, p.delta.energy);
    sd.energy_reached = k >= 0;
    sd.k = k >= 0 ? k : sd.r;
  }
  SvdOptions ob = p.base;
  ob.residual_check = false;
  BaseDecomposition computed;
  if (!base_in) computed = to_decomposition(truncated_svd<T>(Wb.data(), rows, cols, base_svd_fro2, ob));
  const BaseDecomposition& bd = base_in ? *base_in : computed;
  TruncatedSvd<T> sb = from_decomposition<T>(bd);
  const int64_t kb = sb.k, kd = sd.k;
  SideMetrics left, right;
  if (delta_fro2 > 0) {
    // ‖(I − U_b U_bᵀ) ΔW‖² = Σ_i σ_i² sin²θ_i over all r components (V_Δ orthonormal): exact.
    double c2l = 0.0, c2r = 0.0, tmp = 0.0;
    std::vector<double> sl_all = sines(sb.U.data(), sb.r, kb, sd.U.data(), sd.r, sd.r, rows, tmp);
    std::vector<T> Vb = transpose_rows(sb.Vt, cols, kb), Vd = transpose_rows(sd.Vt, cols, sd.r);
    std::vector<double> sr_all = sines(Vb.data(), kb, kb, Vd.data(), sd.r, sd.r, cols, tmp);
    double nl = 0.0, nr = 0.0;
    for (int64_t i = 0; i < sd.r; ++i) {
      double s2 = static_cast<double>(sd.S[i]) * sd.S[i];
      nl += s2 * sl_all[i] * sl_all[i];
      nr += s2 * sr_all[i] * sr_all[i];
    }
    left.null_frac = std::clamp(nl / delta_fro2, 0.0, 1.0);
    right.null_frac = std::clamp(nr / delta_fro2, 0.0, 1.0);
    left.sin_theta = sines(sb.U.data(), sb.r, kb, sd.U.data(), sd.r, kd, rows, c2l);
    right.sin_theta = sines(Vb.data(), kb, kb, Vd.data(), sd.r, kd, cols, c2r);
    chance_levels<T>(left, kb, kd, rows, c2l);
    chance_levels<T>(right, kb, kd, cols, c2r);
  } else {
    rec.strings["note"] = "delta is exactly zero: subspace metrics undefined";
    chance_levels<T>(left, kb, 0, rows, 0.0);
    chance_levels<T>(right, kb, 0, cols, 0.0);
  }
  // Exact SVD from the factors: the residual bound is that of the two thin SVDs (≈ machine precision).
  {
    double kept = 0.0;
    for (int64_t i = 0; i < sd.k; ++i) kept += static_cast<double>(sd.S[i]) * sd.S[i];
    sd.tail_rel = delta_fro2 > 0 ? std::sqrt(std::max(0.0, delta_fro2 - kept) / delta_fro2) : 0.0;
    // ΔW has rank <= r: its nonzero spectrum is Sm (the remaining values are exactly zero).
    sd.spectrum = to_double(sd.S, sd.r);
    // Working precision of the two thin SVDs and the GEMMs (as the engine's exact path).
    const double s1 = sd.r > 0 ? static_cast<double>(sd.S[0]) : 0.0;
    const double wp = std::sqrt(static_cast<double>(rows + cols)) * std::numeric_limits<T>::epsilon() / 2 * s1;
    sd.spectrum_err = 2.0 * wp * s1;
    sd.err.assign(static_cast<size_t>(sd.k), wp);
    sd.rel_error = 0.0;
    const double floor = std::min(s1, 2.0 * wp / p.delta.tol);
    for (int64_t i = 0; i < sd.k; ++i)
      sd.rel_error = std::max(sd.rel_error, floor > 0 ? wp / std::max(static_cast<double>(sd.S[i]), floor) : 0.0);
    sd.tol_reached = sd.rel_error <= p.delta.tol;
  }
  // delta_fro before centering equals ‖L R‖ of the uncentered factors: recompute when centered.
  double delta_fro2_raw = delta_fro2;
  if (p.center) {
    std::vector<T> full(n);
    blas::gemm<T>(false, false, rows, cols, r, T(1), Lf, r, Rf, cols, T(0), full.data(), cols);
    delta_fro2_raw = sumsq(full.data(), n);
  }
  fill_common(rec, sd, sb, base_fro2, delta_fro2_raw, left, right, p, rows, cols);
  if (base_out) *base_out = base_in ? *base_in : std::move(computed);
  return rec;
}

Record analyze_norms(const uint8_t* base, DType bdt, const uint8_t* tuned, DType tdt, uint64_t n) {
  Record rec;
  std::vector<double> dW(n);  // only the norms are kept: W_b itself is not stored
  DeltaStats st = fused_delta<double>(tuned, tdt, base, bdt, n, nullptr, dW.data());
  if (skip_nonfinite(rec, st)) return rec;
  rec.scalars["delta_fro"] = std::sqrt(st.sumsq_delta);
  rec.scalars["delta_rel"] = st.sumsq_base > 0 ? std::sqrt(st.sumsq_delta / st.sumsq_base) : kNaN;
  rec.scalars["base_fro"] = std::sqrt(st.sumsq_base);
  return rec;
}

template <typename T>
std::vector<double> sin_theta(const T* Ub, int64_t kb, const T* Ud, int64_t kd, int64_t dim, double& cos2_sum) {
  return sines(Ub, kb, kb, Ud, kd, kd, dim, cos2_sum);
}
template std::vector<double> sin_theta<float>(const float*, int64_t, const float*, int64_t, int64_t, double&);
template std::vector<double> sin_theta<double>(const double*, int64_t, const double*, int64_t, int64_t, double&);

template Record analyze_dense<float>(const uint8_t*, DType, const uint8_t*, DType, int64_t, int64_t,
                                     const AnalyzeParams&, const BaseDecomposition*, BaseDecomposition*);
template Record analyze_dense<double>(const uint8_t*, DType, const uint8_t*, DType, int64_t, int64_t,
                                      const AnalyzeParams&, const BaseDecomposition*, BaseDecomposition*);
template Record analyze_factored<float>(const uint8_t*, DType, int64_t, int64_t, const float*, const float*, int64_t,
                                        const AnalyzeParams&, const BaseDecomposition*, BaseDecomposition*);
template Record analyze_factored<double>(const uint8_t*, DType, int64_t, int64_t, const double*, const double*,
                                         int64_t, const AnalyzeParams&, const BaseDecomposition*, BaseDecomposition*);

}  // namespace pysafe

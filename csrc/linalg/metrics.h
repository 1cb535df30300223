// Per-matrix metrics of engine.md §5: the weight delta's spectrum and where its energy lies
// relative to the base weight's top-k column / row spaces, each beside its chance level.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "linalg/svd.h"

namespace pysafe {

/// Options of one matrix analysis (the CLI's flags, per matrix).
struct AnalyzeParams {
  SvdOptions delta;          ///< rank rule and SVD method for ΔW (--rank/--energy/--exact/...)
  SvdOptions base;           ///< the same for W_base (--base-rank/--base-energy)
  bool center = false;       ///< subtract the mean row (mean over `out`) before the SVDs (--center)
  bool transpose = false;    ///< stored as (in, out), e.g. HF GPT-2 Conv1D: swap left and right
  bool save_vectors = false; ///< return the kept singular vectors (--save-vectors)
};

/// A dense row-major matrix of doubles or floats returned to Python.
struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;
};

/// One tensor's results. Keys are the JSON keys of engine.md §5.
struct Record {
  std::map<std::string, double> scalars;               ///< NaN where undefined (JSON null)
  std::map<std::string, std::string> strings;
  std::map<std::string, std::vector<double>> arrays;   ///< spectra, sin θ
  std::map<std::string, Mat> vectors;                  ///< with save_vectors: U_delta, V_delta, U_base, V_base
  std::string skip_reason;                             ///< non-empty: the tensor was skipped
};

/// W_base's decomposition as the metrics use it: stored orientation, after --center, the kept k
/// components plus every singular value computed. It depends only on W_base and the base SVD options,
/// so it can be reused across comparisons against the same base (pysafe's on-disk cache).
/// Values are held as double; a float analysis stores floats exactly, so a round trip is lossless.
struct BaseDecomposition {
  int64_t rows = 0, cols = 0;  ///< stored shape of W_base
  int64_t k = 0;               ///< components kept by the base rank rule
  bool f64 = false;            ///< precision of the analysis that computed it (T = double)
  std::vector<double> S;       ///< every computed singular value (>= k of them), descending
  std::vector<double> U;       ///< rows×k row-major
  std::vector<double> Vt;      ///< k×cols row-major
  std::string method;          ///< TruncatedSvd::method
  bool full_spectrum = false, energy_reached = true;
  double fro2 = 0.0, rel_error = 0.0, tail_rel = 0.0;
  int64_t sketch_passes = 0;
  bool tol_reached = true;      ///< TruncatedSvd::tol_reached
  std::vector<double> err;      ///< TruncatedSvd::err (bound per kept value)
  std::vector<double> spectrum; ///< TruncatedSvd::spectrum (all values when full_spectrum)
  double spectrum_err = 0.0;    ///< TruncatedSvd::spectrum_err
  double flops = 0.0;           ///< TruncatedSvd::flops
};

/// Dense path: ΔW = tuned − base formed in T (float or double) from the raw stored bytes.
/// `rows`×`cols` is the stored shape.
template <typename T>
Record analyze_dense(const uint8_t* base, DType base_dtype, const uint8_t* tuned, DType tuned_dtype, int64_t rows,
                     int64_t cols, const AnalyzeParams& p, const BaseDecomposition* base_in = nullptr,
                     BaseDecomposition* base_out = nullptr);

/// Factored path (PEFT/LoRA): stored ΔW = L · R with L rows×r, R r×cols (already scaled), analysed
/// exactly from its factors without forming L·R.
/// Both paths: with `base_in` (matching shape and precision) W_base's SVD is not computed but taken
/// from it; with `base_out` the decomposition used is written there (left empty for a skipped tensor).
template <typename T>
Record analyze_factored(const uint8_t* base, DType base_dtype, int64_t rows, int64_t cols, const T* L, const T* R,
                        int64_t r, const AnalyzeParams& p, const BaseDecomposition* base_in = nullptr,
                        BaseDecomposition* base_out = nullptr);

/// E[‖(I − P) u‖] for u uniform on the unit sphere of R^n and P a rank-k orthogonal projector: the
/// chance level of a mean sin θ against a k-dimensional subspace (exact, through lgamma).
double sin_theta_chance(int64_t n, int64_t k);

/// sin θ_i = ‖u_i − Ub Ubᵀ u_i‖ (clipped to 1) for the `kd` columns u_i of `Ud` (dim×kd, row-major)
/// against the column space of `Ub` (dim×kb, row-major, orthonormal columns): the metric behind the
/// records' sin_theta_left/right, for callers that bring their own bases. `cos2_sum` gets ‖Ubᵀ Ud‖_F².
template <typename T>
std::vector<double> sin_theta(const T* Ub, int64_t kb, const T* Ud, int64_t kd, int64_t dim, double& cos2_sum);

/// Norm-only path for 1-D tensors (and any tensor analysed without SVD): delta_fro, delta_rel.
Record analyze_norms(const uint8_t* base, DType base_dtype, const uint8_t* tuned, DType tuned_dtype, uint64_t n);

}  // namespace pysafe

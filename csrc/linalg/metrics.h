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

/// Dense path: ΔW = tuned − base formed in T (float or double) from the raw stored bytes.
/// `rows`×`cols` is the stored shape.
template <typename T>
Record analyze_dense(const uint8_t* base, DType base_dtype, const uint8_t* tuned, DType tuned_dtype, int64_t rows,
                     int64_t cols, const AnalyzeParams& p);

/// Factored path (PEFT/LoRA): stored ΔW = L · R with L rows×r, R r×cols (already scaled), analysed
/// exactly from its factors without forming L·R.
template <typename T>
Record analyze_factored(const uint8_t* base, DType base_dtype, int64_t rows, int64_t cols, const T* L, const T* R,
                        int64_t r, const AnalyzeParams& p);

/// E[‖(I − P) u‖] for u uniform on the unit sphere of R^n and P a rank-k orthogonal projector: the
/// chance level of a mean sin θ against a k-dimensional subspace (exact, through lgamma).
double sin_theta_chance(int64_t n, int64_t k);

/// Norm-only path for 1-D tensors (and any tensor analysed without SVD): delta_fro, delta_rel.
Record analyze_norms(const uint8_t* base, DType base_dtype, const uint8_t* tuned, DType tuned_dtype, uint64_t n);

}  // namespace pysafe

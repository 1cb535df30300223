// The per-entry pass of the distance engine: Gram products to distances, in place, one row segment at a time.
//
// The pass touches every entry of an n×m distance matrix once, so next to the GEMM it is the only cost
// that grows with n·m. It is compiled for AVX-512, AVX2 and the baseline and picked at load time
// (GCC/Clang target_clones on x86-64), so the wheel stays portable. Arithmetic is in T: for f32 the
// combination s² = ‖a‖² + ‖b‖² − 2g adds at most ~3u(‖a‖² + ‖b‖²) ≤ ~20u·s² of error on the entries it
// keeps (a kept entry has s² ≥ c‖a‖‖b‖, c ≈ 0.38 at d = 1,024), far inside the engine's 1e-5 target; the
// others are marked for the caller, which recomputes them difference-first in f64.
#pragma once

#include <cstdint>

namespace pysafe::dist::kernel {

/// For q in [0, n), with g = io[q] on entry (the Gram product a·b_q):
///   s² = sa + sqb[q] − 2g   (− 0 when `gram` is false: no GEMM ran, io is not read);
///   io[q] = −1 where s² < ca·nb[q] (untrustworthy: the caller recomputes it), else
///           Euclidean: √max(s², 0); cosine: min(½·max(s², 0), 2).
/// Returns whether any entry was marked −1 (no distance is negative).
bool gram_row(float* io, int64_t n, float sa, const float* sqb, float ca, const float* nb, bool euclid, bool gram);
bool gram_row(double* io, int64_t n, double sa, const double* sqb, double ca, const double* nb, bool euclid,
              bool gram);

}  // namespace pysafe::dist::kernel

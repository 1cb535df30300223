#include "linalg/gram_kernel.h"

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__)
#define PYSAFE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYSAFE_CLONES
#endif

namespace pysafe::dist::kernel {
namespace {

// One loop per metric, with no branch inside, so that it vectorises (the marking is a select).
template <typename T, bool kEuclid>
inline bool row(T* __restrict io, int64_t n, T sa, const T* __restrict sqb, T ca, const T* __restrict nb, T two) {
  int flagged = 0;
  for (int64_t q = 0; q < n; ++q) {
    const T s2 = sa + sqb[q] - two * io[q];
    const bool bad = s2 < ca * nb[q];
    flagged |= bad;
    const T c = std::max(s2, T(0));
    const T v = kEuclid ? std::sqrt(c) : std::min(T(0.5) * c, T(2));
    io[q] = bad ? T(-1) : v;
  }
  return flagged != 0;
}

template <typename T>
inline bool dispatch(T* io, int64_t n, T sa, const T* sqb, T ca, const T* nb, bool euclid, bool gram) {
  if (!gram) std::fill(io, io + n, T(0));  // no GEMM ran (d = 0): every product is 0
  return euclid ? row<T, true>(io, n, sa, sqb, ca, nb, T(2)) : row<T, false>(io, n, sa, sqb, ca, nb, T(2));
}

}  // namespace

PYSAFE_CLONES bool gram_row(float* io, int64_t n, float sa, const float* sqb, float ca, const float* nb, bool euclid,
                            bool gram) {
  return dispatch<float>(io, n, sa, sqb, ca, nb, euclid, gram);
}

PYSAFE_CLONES bool gram_row(double* io, int64_t n, double sa, const double* sqb, double ca, const double* nb,
                            bool euclid, bool gram) {
  return dispatch<double>(io, n, sa, sqb, ca, nb, euclid, gram);
}

}  // namespace pysafe::dist::kernel

// A minimal std::thread parallel_for. We avoid OpenMP on purpose: torch ships its own libgomp
// and two OpenMP runtimes in one process are a known source of hangs and oversubscription.
#pragma once

#include <algorithm>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace pysafe {

/// Number of worker threads used by the core's own loops and by BLAS (set_num_threads).
int num_threads();
/// Set the thread count for the core and for OpenBLAS; n <= 0 means "all hardware threads".
void set_num_threads(int n);

/// Run fn(begin, end) over [0, n) split into at most num_threads() contiguous chunks of at
/// least `grain` items. Exceptions from workers are re-thrown on the calling thread.
template <typename Fn>
void parallel_for(size_t n, size_t grain, Fn&& fn) {
  if (n == 0) return;
  size_t nt = static_cast<size_t>(std::max(1, num_threads()));
  nt = std::min(nt, std::max<size_t>(1, n / std::max<size_t>(1, grain)));
  if (nt <= 1) {
    fn(size_t(0), n);
    return;
  }
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(nt);
  size_t chunk = (n + nt - 1) / nt;
  for (size_t t = 1; t < nt; ++t) {
    size_t b = t * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    workers.emplace_back([&, t, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(size_t(0), std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace pysafe

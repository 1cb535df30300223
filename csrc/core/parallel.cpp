#include "core/parallel.h"

#include <atomic>

#include "linalg/blas.h"

namespace pysafe {

namespace {
std::atomic<int> g_threads{0};
}

int num_threads() {
  int n = g_threads.load();
  if (n <= 0) {
    unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }
  return n;
}

void set_num_threads(int n) {
  g_threads.store(n);
  blas::set_num_threads(num_threads());
}

}  // namespace pysafe

#include "backend/staging.h"

#include <algorithm>

#include "core/error.h"

namespace pysafe::backend {

std::vector<Chunk> plan_chunks(size_t bytes, size_t chunk_bytes, size_t align) {
  PYSAFE_CHECK(align > 0 && bytes % align == 0, Value, "staging", "cannot stage ", bytes,
               " bytes in whole elements of ", align, " bytes");
  const size_t step = std::max(align, chunk_bytes / align * align);
  std::vector<Chunk> plan;
  plan.reserve(bytes / step + 1);
  for (size_t off = 0; off < bytes; off += step)
    plan.push_back({off, std::min(step, bytes - off), static_cast<int>(plan.size() % 2)});
  return plan;
}

}  // namespace pysafe::backend

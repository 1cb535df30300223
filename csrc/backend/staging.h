// How a host array travels to a GPU: in chunks through two pinned staging buffers that take turns
// (slot 0, 1, 0, ...), so that the host copy of chunk i+1 into one buffer overlaps the DMA of chunk i
// out of the other, and the device work on chunk i (its upcast) runs on the stream of its slot.
// The plan is pure arithmetic, shared by the CUDA backend and its CPU tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pysafe::backend {

struct Chunk {
  size_t offset = 0;  ///< first byte
  size_t bytes = 0;   ///< length, a multiple of `align` (except nothing: the plan covers whole elements)
  int slot = 0;       ///< staging buffer and stream: 0 or 1, alternating
};

/// Chunks of at most `chunk_bytes` (rounded down to a multiple of `align`, at least `align`) covering
/// [0, bytes) in order; `bytes` must be a multiple of `align`.
std::vector<Chunk> plan_chunks(size_t bytes, size_t chunk_bytes, size_t align);

}  // namespace pysafe::backend

// What the emulated GPU's runtime (runtime.cpp) offers its cuBLAS and cuSOLVER (mathlibs.cpp).
#pragma once

#include <cstddef>
#include <functional>
#include <string>

#include "cuda_runtime.h"

namespace emu {

/// Queues `op` on stream `s` (null: the legacy default stream).
void enqueue(cudaStream_t s, std::function<void()> op);
/// One line on stderr, prefixed "pysafe CUDA emulator: ".
void complain(const std::string& what);

}  // namespace emu

// The backend's Python surface: build_info's CUDA fields and the `_core.backend` submodule, whose
// functions run one primitive on a chosen device (numpy in, numpy out) so that tests and benchmarks can
// hold every backend against the CPU one and against float64 references.
#pragma once

#include <pybind11/pybind11.h>

namespace pysafe {

void add_cuda_info(pybind11::dict& d);
void register_backend(pybind11::module_& m);

}  // namespace pysafe

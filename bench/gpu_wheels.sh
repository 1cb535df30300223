#!/usr/bin/env bash
# Prepare, on a machine with network access, the wheels that bench/gpu_check.sh installs on a GPU
# machine that has none: what pysafe needs beyond a CUDA build of PyTorch's usual environment (torch,
# numpy, nvidia-cublas/nvidia-cusolver, scikit-build-core, pybind11, cmake, ninja, safetensors, h5py,
# click, rich, numba, matplotlib, transformers, scipy, pytest). Today that is scipy-openblas32 alone.
# The folder .whl/ at the repository root is git-ignored; carry it to the GPU machine with the tree.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU image's python3
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "scipy-openblas32>=0.3.27"
ls -l .whl

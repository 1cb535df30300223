#!/usr/bin/env bash
# The CUDA backend's own code on the emulated GPU: builds pysafe a second time with
# PYSAFE_CUDA_EMULATOR=ON (csrc/backend/cuda_backend.cu compiled as C++ against a host emulation of the
# CUDA runtime, cuBLAS and cuSOLVER; no toolkit or GPU needed) into a folder of its own, then runs the
# `cuda` tests against that build. What the emulator checks and what it cannot: docs/gpu.md.
#
#   bash tests/emulated_gpu.sh [EXTRA PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d "${TMPDIR:-/tmp}/pysafe-emulated-gpu.XXXXXX")
trap 'rm -rf "$dir"' EXIT
python3 -m pip install --quiet --no-deps --no-compile --target "$dir/site" -Cbuild-dir="$dir/build" \
  -Ccmake.define.PYSAFE_CUDA_EMULATOR=ON .
cd "$dir"  # not the source tree: its pysafe/ has no _core
PYTHONPATH="$dir/site" python3 -P -c "import pysafe, sys; i = pysafe.build_info(); sys.exit(0 if i.get('cuda_emulator') and i['cuda_devices'] == 1 else 'not the emulator build: ' + str(i))"
PYTHONPATH="$dir/site" python3 -P -m pytest -m cuda -p no:cacheprovider "$OLDPWD/tests" "$@"

#!/usr/bin/env bash
# The GPU device check: on a fresh GPU machine without network, build pysafe with its CUDA backend from
# this working tree, run the `cuda` tests (every backend primitive and the algorithms against the CPU
# backend and float64 references), then the benchmarks of bench/gpu_bench.py; one JSON of results,
# rewritten as it goes. The whole run stays within PYSAFE_GPU_CHECK_BUDGET seconds (default 480):
# every step has its own time limit, and the benchmarks skip the parts that would not fit.
#
# It needs, on the GPU machine: a CUDA build of PyTorch with its nvidia-cublas/nvidia-cusolver packages,
# nvcc, cmake, ninja, scikit-build-core, pybind11 and pysafe's runtime dependencies; and the wheels of
# what that environment lacks, prepared where there is network by `bash bench/gpu_wheels.sh` (.whl/).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]      # default: $OUT if set, else bench/results
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${PYSAFE_GPU_CHECK_BUDGET:-480}
results=${1:-${OUT:-bench/results}}
mkdir -p "$results"
json="$results/gpu_check.json"
log="$results/gpu_check.log"
site=/tmp/pysafe-site
: >"$log"

note() {  # note KEY VALUE-AS-JSON: one field of the "check" object of the results file
  python3 - "$json" "$1" "$2" <<'EOF'
import json, os, sys
path, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = json.load(open(path)) if os.path.exists(path) else {}
data.setdefault("check", {})[key] = value
json.dump(data, open(path + ".tmp", "w"), indent=1)
os.replace(path + ".tmp", path)
EOF
}
say() { echo "gpu_check [$(($(date +%s) - start)) s]: $*" | tee -a "$log"; }
fail() {
  say "FAILED: $*"
  note failed "$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$*")"
  exit 1
}
left() { echo $((budget - ($(date +%s) - start))); }

note started "$start"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee -a "$log"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log" ||
  fail "torch sees no CUDA device on this machine"
command -v nvcc >/dev/null || fail "nvcc is not on PATH: the CUDA backend cannot be built"
ls .whl/*.whl >/dev/null 2>&1 || fail "no wheels in .whl/: run 'bash bench/gpu_wheels.sh' where there is network and carry .whl"

say "installing the wheels of .whl/ into $site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  >>"$log" 2>&1 || fail "pip could not install .whl/*.whl (see $log)"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

say "building pysafe with CUDA (sm_90)"
t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 240 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
  --no-cache-dir --target "$site" --upgrade -Cbuild-dir=/tmp/pysafe-build \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 . >>"$log" 2>&1 || fail "the build failed or ran over 240 s (see $log)"
note build_s "$(($(date +%s) - t0))"
info=$(python3 -P -c "import json, pysafe; print(json.dumps(pysafe.build_info()))" 2>>"$log") ||
  fail "the built pysafe does not import (see $log)"
note build_info "$info"
python3 -P -c "import pysafe, sys; i = pysafe.build_info(); sys.exit(0 if i['cuda'] and i['cuda_devices'] > 0 else 1)" ||
  fail "pysafe was built without its CUDA backend or sees no device: $info"
python3 -P -c "import pysafe.backend as b; b.engine_device('cuda')" >>"$log" 2>&1 ||
  fail "the CUDA backend does not start: $(tail -1 "$log")"
say "built: $info"

say "running the cuda tests"
t0=$(date +%s)
timeout 150 python3 -P -m pytest -q -m cuda -p no:cacheprovider --junitxml="$results/cuda_tests.xml" tests \
  >>"$log" 2>&1
rc=$?
note tests_rc "$rc"
note tests_s "$(($(date +%s) - t0))"
note tests "$(python3 - "$results/cuda_tests.xml" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s[0]
    print(json.dumps({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}))
except Exception as exc:  # noqa: BLE001
    print(json.dumps({"unreadable": str(exc)}))
EOF
)"
say "cuda tests: rc $rc ($(grep -E '(passed|failed|error)' "$log" | tail -1))"

remaining=$(($(left) - 10))
[ "$remaining" -gt 30 ] || fail "no time left for the benchmarks"
say "benchmarks (${remaining} s at most)"
timeout "$remaining" python3 bench/gpu_bench.py --out "$json" --deadline $((start + budget - 15)) 2>&1 | tee -a "$log"
note bench_rc "${PIPESTATUS[0]}"
note total_s "$(($(date +%s) - start))"
say "done: $json"
[ "$rc" -eq 0 ] || exit 2

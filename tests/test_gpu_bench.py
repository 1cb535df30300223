"""bench/gpu_bench.py, the benchmarks of the GPU device check, run end to end at toy sizes on the CUDA
emulator's build (torch on the CPU, pysafe's engine on the emulated GPU), so that the one run a GPU
machine gets does not fail on the script itself. Its numbers mean nothing here; what is checked is that
every part completes and that the GPU results it records agree with the CPU ones and float64."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pysafe import _core

_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


@pytest.mark.cuda
def test_gpu_bench_completes_every_part_on_the_emulator(tmp_path):
    if not _core.build_info().get("cuda_emulator"):
        pytest.skip("on a real GPU bench/gpu_check.sh runs this script at its real sizes")
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "-P", str(_SCRIPT), "--device", "emulated", "--out", str(out),
                        "--preset", "tiny", "--layers", "1", "--rank", "4", "--dist-n", "300", "--dist-d", "16",
                        "--lab-steps", "5", "--lab-batch", "2", "--data-dir", str(tmp_path / "pair"),
                        "--deadline", str(time.time() + 600)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for part in ("env", "rates", "analyze", "distances", "lab"):
        assert part in res and "error" not in res[part] and "skipped" not in res[part], (part, res.get(part))
    assert res["env"]["pysafe"]["cuda_emulator"] is True
    a = res["analyze"]
    assert a["tensors"] == 12 and a["peak_device_gib"] is not None
    assert all(v < 1e-5 for v in a["cpu_vs_gpu_max_abs_diff"].values()), a["cpu_vs_gpu_max_abs_diff"]
    assert len(a["torch_sample"]) == 2 and all(row["pysafe_gpu_err"] < 1e-5 for row in a["torch_sample"])
    d = res["distances"]
    assert d["resident_vs_host_max_abs_diff"] == 0 and d["pysafe_max_rel_err"] < 1e-5
    assert res["lab"]["measured_steps"] >= 1 and res["lab"]["steps_per_s"] > 0

"""Time `pysafe drift BASE ALIGNED TUNED` beside `pysafe analyze BASE ALIGNED` on one make-pair pair.

The pair of `pysafe make-pair` is BASE and ALIGNED; TUNED is ALIGNED plus a planted change in every 2-D matrix
(−0.3 of the alignment change plus a rank-4 part of its own), written by this script with `safetensors`. Each
command runs in its own subprocess, in alternating order, `--repeat` times; one JSON line per run, then a
summary line with the median seconds and the ratios to analyze.

    python bench/bench_drift.py                         # small preset, 3 repeats
    python bench/bench_drift.py --preset tiny --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def make_tuned(pair: Path, seed: int = 0) -> Path:
    """pair/tuned2: ALIGNED (pair/tuned) + ΔT, ΔT = −0.3·(ALIGNED − BASE) + a random rank-4 part, in bf16."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = pair / "tuned2"
    if (out / "model.safetensors").exists():
        return out
    g = torch.Generator().manual_seed(seed)

    def tensors(d):
        res = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    res[k] = h.get_tensor(k)
        return res

    base, aligned = tensors(pair / "base"), tensors(pair / "tuned")
    new = {}
    for name, w in aligned.items():
        if w.ndim == 2:
            a, b = w.double(), base[name].double()
            m, n = w.shape
            low = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g,
                                                                                     dtype=torch.float64)
            d = -0.3 * (a - b) + low * (0.02 * a.norm() / low.norm())
            new[name] = (a + d).to(w.dtype)
        else:
            new[name] = w.clone()
    out.mkdir(exist_ok=True)
    save_file(new, str(out / "model.safetensors"))
    return out


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--data-dir", default=None, help="default bench/data/drift-<preset>")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results/drift", help="report folders (overwritten)")
    args = ap.parse_args()
    pair = Path(args.data_dir or f"bench/data/drift-{args.preset}")
    if not (pair / "tuned").exists():
        subprocess.run([sys.executable, "-m", "pysafe", "make-pair", "--preset", args.preset, "--out", str(pair)],
                       check=True)
    tuned2 = make_tuned(pair)
    exe = [sys.executable, "-m", "pysafe"]
    cmds = {
        "analyze": exe + ["analyze", str(pair / "base"), str(pair / "tuned"), "--no-cache"],
        "drift": exe + ["drift", str(pair / "base"), str(pair / "tuned"), str(tuned2)],
        "drift --intruder-k 0": exe + ["drift", str(pair / "base"), str(pair / "tuned"), str(tuned2),
                                       "--intruder-k", "0"],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(args.repeat):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for key in order:
            s = run(cmds[key] + ["--out", f"{args.out}/{key.replace(' ', '_')}", "--overwrite"])
            times[key].append(s)
            print(json.dumps({"tool": key, "repeat": i, "seconds": round(s, 2)}), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"tool": "summary", "preset": args.preset, "median_s": {k: round(v, 2) for k, v in med.items()},
                      "ratio_to_analyze": {k: round(v / med["analyze"], 2) for k, v in med.items()}}))


if __name__ == "__main__":
    main()

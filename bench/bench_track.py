"""`pysafe track` with and without the base cache, and `--ray` with 1, 2 and 4 local workers, in one run.

(a) track: a short `pysafe train ssft --keep-every 1` run from the shipped cpu-preset pretrained model gives
    `steps` checkpoints (3 layers, width 128); `pysafe.track` over them without a cache and with a fresh
    cache (W_base's SVDs once, then read), `repeats` times each, interleaved; the records of the two must be
    equal (timings and base_svd_cached aside).
(b) ray: `pysafe.compare` of a `make_pair(preset)` pair locally and with `compare_on_ray` on a private
    local cluster of 1, 2 and 4 workers (one task per layer group; every run at `--threads 1`, so one worker
    is one core's worth of work). The cluster's start is timed apart from the comparison; throughput per
    worker is tensors / s / workers; overhead is ray time / local time (best of `repeats` each, local and
    every cluster size measured in turn). Records checked equal to the local run's, bit for bit.

The load average (1 min) is recorded before and after every measurement: the numbers of a shared machine
mean little without it. Output: one JSON line per result (also appended to --results), then a table.

    python bench/bench_track.py                               # the numbers in bench/README.md
    python bench/bench_track.py --steps 4 --preset tiny --repeats 1 --workers 1 2   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pysafe
from pysafe.distributed import cluster, compare_on_ray
from pysafe.lab.config import DEMO_DIR

STEPS = 20          # lab checkpoints of the trajectory (one kept per training step)
BATCH = 16          # batch size of the short fine-tune that makes them
REPEATS = 2         # timed runs of each track variant (the minimum is reported)
PRESET = "small"    # make_pair preset of the Ray comparison (512x1376 and 512x512 matrices, 4 layers)
WORKERS = (1, 2, 4)  # local Ray cluster sizes


def load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(row: dict, results) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if results:
        with open(results, "a") as f:
            f.write(line + "\n")


def same(a, b, ignore=("base_svd_cached",)) -> bool:
    if [r["name"] for r in a] != [r["name"] for r in b]:
        return False
    for x, y in zip(a, b):
        for k, u in x.items():
            if k.startswith("time_") or k in ignore:
                continue
            v = y.get(k)
            if isinstance(u, np.ndarray):
                if u.tobytes() != v.tobytes():
                    return False
            elif isinstance(u, float) and math.isnan(u):
                if not (isinstance(v, float) and math.isnan(v)):
                    return False
            elif u != v:
                return False
    return True


def bench_track(work: Path, steps: int, batch: int, repeats: int, results) -> list[dict]:
    run = work / "run"
    base = DEMO_DIR / "pretrain"
    if not (run / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pysafe", "train", "ssft", "--preset", "cpu", "--init", str(base),
                        "--steps", str(steps), "--batch-size", str(batch), "--keep-every", "1", "--threads", "1",
                        "--quiet", "--out", str(run)], check=True)
        print(f"# made {steps} checkpoints in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows, recs = [], {}
    for rep in range(repeats):
        for variant in ("no_cache", "cache"):
            with tempfile.TemporaryDirectory() as tmp:
                before = load()
                t0 = time.perf_counter()
                traj = pysafe.track(base, run, cache=False if variant == "no_cache" else tmp, threads=1)
                sec = time.perf_counter() - t0
            recs[variant] = traj
            svd_base = sum(r.get("time_svd_base", 0.0) for p in traj.points for r in p.records)
            row = {"bench": "track", "variant": variant, "repeat": rep, "checkpoints": len(traj.points),
                   "tensors": len(traj.points[0].records), "seconds": round(sec, 3),
                   "base_svd_seconds": round(svd_base, 3), "cache": traj.cache,
                   "load_before": before, "load_after": load()}
            emit(row, results)
            rows.append(row)
    equal = all(same(p.records, q.records) for p, q in zip(recs["no_cache"].points, recs["cache"].points))
    emit({"bench": "track", "records_equal": equal}, results)
    return rows


def bench_ray(work: Path, preset: str, workers, repeats: int, results) -> list[dict]:
    pair = work / f"pair-{preset}"
    if not (pair / "tuned").exists():
        pysafe.make_pair(pair, preset)
    base, tuned = pair / "base", pair / "tuned"
    pysafe.compare(base, tuned, threads=1)  # warm-up: page cache, BLAS threads
    rows = []
    for rep in range(repeats):  # local and every cluster size in turn, so that load drifts hit all alike
        before = load()
        t0 = time.perf_counter()
        local = pysafe.compare(base, tuned, threads=1)
        sec_local = time.perf_counter() - t0
        n = len(local.records)
        row = {"bench": "ray", "variant": "local", "repeat": rep, "workers": 0, "tensors": n,
               "seconds": round(sec_local, 3), "load_before": before, "load_after": load()}
        emit(row, results)
        rows.append(row)
        for w in workers:
            before = load()
            t0 = time.perf_counter()
            with cluster(f"local:{w}"):
                start = time.perf_counter() - t0
                t1 = time.perf_counter()
                dist = compare_on_ray(base, tuned, f"local:{w}", threads=1)
                sec = time.perf_counter() - t1
            row = {"bench": "ray", "variant": f"local:{w}", "repeat": rep, "workers": w, "tensors": n,
                   "seconds": round(sec, 3), "cluster_start_seconds": round(start, 3),
                   "records_equal": same(local.records, dist.records, ignore=()),
                   "load_before": before, "load_after": load()}
            emit(row, results)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench/data/track"), help="where the checkpoints go")
    ap.add_argument("--steps", type=int, default=STEPS, help="lab checkpoints of the trajectory")
    ap.add_argument("--batch", type=int, default=BATCH, help="batch size of the fine-tune making them")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per track variant")
    ap.add_argument("--preset", default=PRESET, help="make_pair preset of the Ray comparison")
    ap.add_argument("--workers", type=int, nargs="+", default=list(WORKERS), help="local Ray cluster sizes")
    ap.add_argument("--skip", nargs="*", default=[], choices=["track", "ray"], help="parts to leave out")
    ap.add_argument("--results", default=None, help="also append the JSON lines to this file")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()}", file=sys.stderr)
    track_rows = [] if "track" in a.skip else bench_track(a.work, a.steps, a.batch, a.repeats, a.results)
    ray_rows = [] if "ray" in a.skip else bench_ray(a.work, a.preset, a.workers, a.repeats, a.results)
    if track_rows:
        print("\n| track | checkpoints × tensors | best s | W_base SVD s | load 1 min |\n|---|---|---|---|---|")
        for v in ("no_cache", "cache"):
            rs = [r for r in track_rows if r["variant"] == v]
            best = min(rs, key=lambda r: r["seconds"])
            print(f"| {v} | {best['checkpoints']} × {best['tensors']} | {best['seconds']:.2f} | "
                  f"{best['base_svd_seconds']:.2f} | {best['load_before']}–{best['load_after']} |")
    if ray_rows:
        local = min(r["seconds"] for r in ray_rows if r["workers"] == 0)
        print("\n| run | best s | cluster start s | tensors/s/worker | × local | records equal | load 1 min |\n"
              "|---|---|---|---|---|---|---|")
        for v in dict.fromkeys(r["variant"] for r in ray_rows):
            rs = [r for r in ray_rows if r["variant"] == v]
            best = min(rs, key=lambda r: r["seconds"])
            w = max(1, best["workers"])
            start = min(r["cluster_start_seconds"] for r in rs) if best["workers"] else "–"
            equal = all(r["records_equal"] for r in rs) if best["workers"] else "–"
            print(f"| {v} | {best['seconds']:.2f} | {start} | {best['tensors'] / best['seconds'] / w:.2f} | "
                  f"{best['seconds'] / local:.2f} | {equal} | {min(r['load_before'] for r in rs)}–"
                  f"{max(r['load_after'] for r in rs)} |")


if __name__ == "__main__":
    main()

"""Benchmark `pysafe.pairwise_distances` (issue 4, point 2) against what a user would call today.

On one pair of random f32 activation sets a (N×d) and b (N×d), in one run:
  - pysafe: `pysafe.pairwise_distances(a, b)` (and the self matrix `pairwise_distances(a)`);
  - torch: `torch.cdist(a, b)` (its default, which switches to the matmul formula for large inputs);
  - sklearn: `sklearn.metrics.pairwise_distances(a, b, n_jobs=1)` (skipped with a note if not installed);
  - the machine's sgemm rate: the N×d · d×N product alone (NumPy/OpenBLAS and torch, the larger), the
    floor any Gram-based method sits on; pysafe's `sgemm_fraction` = sgemm time / pysafe time;
  - accuracy: max relative error of every tool on `check_rows` random rows against a float64
    difference-first reference;
  - memory: peak RSS of `distance_summary` (silhouette + kNN) at N and at N/2: summaries do not hold N².
One JSON line per result, then a summary line with the verdicts.

    python bench/bench_distance.py                      # N=20000, d=1024 (~2 min on 2 cores)
    python bench/bench_distance.py --n 4000 --d 256     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

# --- knobs (each is a command-line flag) ---
n = 20000             # points per set
d = 1024              # features
threads = 0           # threads for every tool (0: all cores)
repeats = 2           # timed runs per tool (the best counts)
check_rows = 200      # rows checked against float64
knn = 10              # k of the summary run
seed = 0
results = None        # append the JSON lines to this file
target_fraction = 0.8  # pysafe must reach this share of the sgemm rate


def emit(row):
    row = {"bench": "distance", "machine": platform.node(), "cpus": os.cpu_count(), "n": n, "d": d, **row}
    line = json.dumps(row)
    print(line, flush=True)
    if results:
        with open(results, "a") as f:
            f.write(line + "\n")


def best(fn):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        if _ + 1 < repeats:
            del out
            out = None
    return min(times), out


def max_rel_err(D, a, b, rows):
    a64, b64 = a[rows].astype(np.float64), b.astype(np.float64)
    worst = 0.0
    for i, r in enumerate(rows):
        want = np.sqrt(((b64 - a64[i]) ** 2).sum(1))
        got = np.asarray(D[r], np.float64)
        worst = max(worst, float((np.abs(got - want) / np.maximum(want, 1e-30)).max()))
    return worst


def summary_rss(n_pts: int) -> float:
    """Peak RSS growth (MB) during `distance_summary` on n_pts points: the high-water mark is reset
    (/proc/self/clear_refs) after the input is built, then read back (VmHWM) after the call."""
    code = (
        "import numpy as np, pysafe\n"
        f"a = np.random.default_rng({seed}).standard_normal(({n_pts}, {d}), dtype=np.float32)\n"
        f"lab = np.arange({n_pts}) % 2\n"
        "def kb(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS:')\n"
        f"pysafe.distance_summary(a, lab, k={knn})\n"
        "print((kb('VmHWM:') - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def cancellation_errors(tools: dict) -> dict:
    """Max relative error of each tool on near-duplicate points on a large common offset (1000 points
    1e-3 apart around 1e4): where the Gram identity in f32 loses every digit unless corrected."""
    rng = np.random.default_rng(seed + 1)
    base = rng.standard_normal((500, 64)) + 1e4
    x = np.concatenate([base, base + 1e-3 * rng.standard_normal((500, 64))]).astype(np.float32)
    x64 = x.astype(np.float64)
    want = np.sqrt(((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1))
    off = ~np.eye(len(x), dtype=bool)
    out = {}
    for name, fn in tools.items():
        got = np.asarray(fn(x, x.copy()), np.float64)
        out[name] = float((np.abs(got - want)[off] / want[off]).max())
    return out


def main():
    g = globals()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key in ("n", "d", "threads", "repeats", "check_rows", "knn", "seed", "results", "target_fraction"):
        v = g[key]
        ap.add_argument("--" + key.replace("_", "-"), type=type(v) if v is not None else str, default=v)
    g.update(vars(ap.parse_args()))

    import torch

    import pysafe

    nt = threads or os.cpu_count()
    torch.set_num_threads(nt)
    pysafe._core.set_num_threads(nt)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d), dtype=np.float32)
    b = rng.standard_normal((n, d), dtype=np.float32)
    rows = rng.choice(n, size=min(check_rows, n), replace=False)

    # the floor: one sgemm of the same shape
    t_np, _ = best(lambda: a @ b.T)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_torch_mm, _ = best(lambda: ta @ tb.T)
    t_gemm = min(t_np, t_torch_mm)
    gflops = 2 * n * n * d / t_gemm / 1e9
    emit({"tool": "sgemm", "seconds": round(t_gemm, 3), "gflops": round(gflops, 1),
          "numpy_s": round(t_np, 3), "torch_s": round(t_torch_mm, 3)})

    t_ps, D = best(lambda: pysafe.pairwise_distances(a, b))
    err_ps = max_rel_err(D, a, b, rows)
    del D
    emit({"tool": "pysafe", "seconds": round(t_ps, 3), "max_rel_err": err_ps,
          "sgemm_fraction": round(t_gemm / t_ps, 3)})
    t_self, S = best(lambda: pysafe.pairwise_distances(a))
    emit({"tool": "pysafe-self", "seconds": round(t_self, 3), "symmetric": bool(np.array_equal(S[:2000, :2000], S[:2000, :2000].T)),
          "zero_diagonal": bool((np.diag(S) == 0).all())})
    del S

    t_cd, C = best(lambda: torch.cdist(ta, tb))
    err_cd = max_rel_err(C.numpy(), a, b, rows)
    del C
    emit({"tool": "torch.cdist", "seconds": round(t_cd, 3), "max_rel_err": err_cd})

    t_sk = err_sk = None
    try:
        from sklearn.metrics import pairwise_distances as skpd

        t_sk, K = best(lambda: skpd(a, b, n_jobs=1))
        err_sk = max_rel_err(K, a, b, rows)
        del K
        emit({"tool": "sklearn", "seconds": round(t_sk, 3), "max_rel_err": err_sk})
    except ImportError:
        emit({"tool": "sklearn", "skipped": "scikit-learn is not installed (pip install scikit-learn)"})

    rss_full, rss_half = summary_rss(n), summary_rss(n // 2)
    emit({"tool": "pysafe-summary", "peak_rss_mb_n": round(rss_full, 1), "peak_rss_mb_half_n": round(rss_half, 1),
          "n2_matrix_mb": round(n * n * 4 / 2**20, 1)})

    tools = {"pysafe": lambda x, y: pysafe.pairwise_distances(x, y),
             "torch.cdist": lambda x, y: torch.cdist(torch.from_numpy(x), torch.from_numpy(y)).numpy()}
    try:
        from sklearn.metrics import pairwise_distances as skpd

        tools["sklearn"] = lambda x, y: skpd(x, y)
    except ImportError:
        pass
    canc = cancellation_errors(tools)
    emit({"tool": "cancellation", "max_rel_err": canc})

    emit({"tool": "summary", "sgemm_fraction": round(t_gemm / t_ps, 3), "target_fraction": target_fraction,
          "speedup_vs_cdist": round(t_cd / t_ps, 2),
          "speedup_vs_sklearn": round(t_sk / t_ps, 2) if t_sk else None,
          "max_rel_err": err_ps, "max_rel_err_cancellation": canc,
          "verdict": {
              "sgemm_rate": "meets" if t_gemm / t_ps >= target_fraction else "misses",
              "faster_than_cdist": t_ps < t_cd,
              "faster_than_sklearn": (t_ps < t_sk) if t_sk else None,
              "accuracy_1e-5": err_ps <= 1e-5 and canc["pysafe"] <= 1e-5,
              "summary_memory_independent_of_n2": rss_full < 0.25 * n * n * 4 / 2**20,
          }})


if __name__ == "__main__":
    main()

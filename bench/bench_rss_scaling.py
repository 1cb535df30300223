"""Peak RSS of `pysafe.compare` against model size: the same preset at several layer counts.

pysafe streams the pair tensor by tensor, so its peak resident memory should be set by the largest
tensor (its f32 workspace), not by the number of layers. Each run is a fresh subprocess (its own
VmHWM), started with the pair dropped from the page cache. One JSON line per layer count, then a
summary line with the RSS ratio next to the bytes ratio and a verdict.

    python bench/bench_rss_scaling.py                     # small preset, --layers 2 and 8
    python bench/bench_rss_scaling.py --preset medium --layers-list 2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_analyze as ba  # noqa: E402  (the pair, workers and helpers are shared)

# --- knobs (nanoGPT style; each is overridable on the command line: --preset tiny --threads 1 ...) ---
preset = "small"          # synthetic pair preset of pysafe.make_pair: tiny, small, medium, llama2-7b
layers_list = "2,8"       # comma-separated layer counts; one pair (and one run) per count
rank = 64                 # fixed k of ΔW's truncated SVD
base_rank = 64            # fixed k of W_base's top-k subspace
threads = 2               # threads for pysafe's core/OpenBLAS (0: all cores)
tool = "pysafe"           # pysafe, or both (the baseline's RSS beside it)
data_root = None          # pairs go to <data_root>/pair-<preset>-L<n> (None: bench/data)
cold = True               # drop each pair from the page cache before its run
results = None            # also append the JSON lines to this file
max_growth = 1.10         # verdict: peak RSS at the most layers <= max_growth x at the fewest (+16 MB slack)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=preset, choices=["tiny", "small", "medium", "llama2-7b"])
    p.add_argument("--layers-list", default=layers_list)
    p.add_argument("--rank", type=int, default=rank)
    p.add_argument("--base-rank", type=int, default=base_rank)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--tool", default=tool, choices=["pysafe", "both"])
    p.add_argument("--data-root", default=data_root)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=cold)
    p.add_argument("--results", default=results)
    p.add_argument("--max-growth", type=float, default=max_growth)
    args = p.parse_args(argv)
    counts = sorted({int(x) for x in args.layers_list.split(",") if x.strip()})
    if len(counts) < 2:
        sys.exit("--layers-list needs at least two layer counts")
    tools = ["pysafe", "baseline"] if args.tool == "both" else ["pysafe"]
    env = {**ba.git_info(), "cpu": ba.cpu_model(), "ncpu": os.cpu_count()}

    rows = {t: [] for t in tools}
    for n in counts:
        root = Path(args.data_root) if args.data_root else ba.REPO / "bench" / "data"
        ns = ba.build_parser().parse_args(["--preset", args.preset, "--layers", str(n), "--rank", str(args.rank),
                                           "--base-rank", str(args.base_rank), "--threads", str(args.threads),
                                           "--data-dir", str(root / f"pair-{args.preset}-L{n}")])
        info = ba.prepare(ns)
        cfg = ba.worker_cfg(ns, info, [])
        largest = max(info["base"][name]["nbytes"] // 2 for name in info["mats"])  # elements (bf16)
        for t in tools:
            if args.cold:
                ba.drop_cache(cfg["files"])
            load = ba.busy_warning(f"{t} on {n} layers")
            r = ba.run_worker(t, cfg)
            row = {"bench": "rss_scaling", "tool": t, "preset": args.preset, "layers": n, "device": "cpu",
                   "dtype": "bf16 in, f32 compute", "shapes": ba.shapes_summary(info["mats"]),
                   "n_matrices": len(info["mats"]), "threads": ba.resolve_threads(args.threads),
                   "rank": args.rank, "base_rank": args.base_rank, "pair_bytes": info["bytes"],
                   "largest_tensor_f32_mb": ba._r(largest * 4 / 2 ** 20, 1),
                   "peak_rss_mb": ba._r(r["peak_rss_mb"], 1), "rss_after_import_mb": ba._r(r["rss_after_import_mb"], 1),
                   "seconds": ba._r(r["seconds"], 3), "bytes_read": r["bytes_read"],
                   "loadavg_1m_at_start": ba._r(load, 2), **env}
            rows[t].append(row)
            ba.emit(row, args.results)

    for t in tools:
        lo, hi = rows[t][0], rows[t][-1]
        rss_ratio = hi["peak_rss_mb"] / lo["peak_rss_mb"]
        ok = hi["peak_rss_mb"] <= args.max_growth * lo["peak_rss_mb"] + 16
        verdict = (f"{'PASS' if ok else 'FAIL'}: {t} peak RSS {lo['peak_rss_mb']:.0f} MB at {lo['layers']} layers, "
                   f"{hi['peak_rss_mb']:.0f} MB at {hi['layers']} layers ({rss_ratio:.2f}x) while the pair grows "
                   f"{hi['pair_bytes'] / lo['pair_bytes']:.2f}x")
        ba.emit({"bench": "rss_scaling", "tool": "summary", "of": t, "preset": args.preset, "layers_list": counts,
                 "rss_ratio": ba._r(rss_ratio, 3), "bytes_ratio": ba._r(hi["pair_bytes"] / lo["pair_bytes"], 3),
                 "rss_growth_mb": ba._r(hi["peak_rss_mb"] - lo["peak_rss_mb"], 1),
                 "max_growth": args.max_growth, "verdict": verdict, **env}, args.results)


if __name__ == "__main__":
    main()

"""Benchmarks of the GPU device check (bench/gpu_check.sh runs this after the build and the `cuda` tests).

One JSON file of results, rewritten after every part (a run cut short still leaves the parts it finished):
  env        pysafe.build_info(), torch and the GPU;
  rates      the device's own ceilings, measured in this run: fp32 and fp64 GEMM (torch, TF32 off, as
             cuBLAS runs pysafe's products) and pinned host-to-device bandwidth;
  analyze    a Llama-shaped bf16 pair made here by pysafe.make_pair: pysafe.compare on the CPU backend and
             on the GPU (same options: fixed ranks, block Krylov), their records side by side, and on a
             sample of matrices torch.svd_lowrank (niter 2, 4, 8) and torch.linalg.svd on the GPU, all held
             against exact float64 singular values (the lowest niter as accurate as pysafe is the one to
             compare times with);
  distances  pysafe.pairwise_distances on the GPU against torch.cdist on the GPU and the fp32 GEMM rate,
             with accuracy against float64 on a row sample;
  lab        steps per second of `pysafe train pretrain --preset paper` on the GPU (after warm-up).
Each part is skipped when less than its budget is left before --deadline (epoch seconds).

    python bench/gpu_bench.py --out results.json [--deadline EPOCH] [--preset medium --layers 2]
    python bench/gpu_bench.py --device emulated ...   # on the CUDA emulator build (tests/test_gpu_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS: dict = {}
# where torch's tensors and baselines run, and where pysafe's engine runs: both "cuda" on a GPU; both
# "cpu" with --device cpu, and torch "cpu" with pysafe on "cuda" with --device emulated (pysafe's CUDA
# emulator build): smoke tests of this script without a GPU, whose numbers mean nothing
TORCH_DEV = ENGINE_DEV = "cuda"


def save(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=1, default=str))
    os.replace(tmp, path)


def run_part(name: str, budget_s: float, deadline: float, out: Path, fn, *args) -> None:
    left = deadline - time.time()
    if left < budget_s:
        RESULTS[name] = {"skipped": f"{left:.0f} s left, the part needs ~{budget_s:.0f} s"}
        save(out)
        print(f"[gpu_bench] {name}: skipped ({left:.0f} s left)", flush=True)
        return
    t0 = time.time()
    print(f"[gpu_bench] {name} ...", flush=True)
    try:
        RESULTS[name] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others
        RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    RESULTS[name]["part_seconds"] = round(time.time() - t0, 2)
    save(out)
    print(f"[gpu_bench] {name}: {json.dumps(RESULTS[name], default=str)[:600]}", flush=True)


def cuda_time(torch, fn, reps: int = 3) -> float:
    """Best of `reps` timings of fn() (seconds), synchronised, after one warm-up call."""
    sync = torch.cuda.synchronize if TORCH_DEV != "cpu" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def part_env() -> dict:
    import torch

    import pysafe

    return {"pysafe": pysafe.build_info(), "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if TORCH_DEV != "cpu" else None,
            "cpu_count": os.cpu_count()}


def part_rates() -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for name, dtype, n in (("fp32_gemm_tflops", torch.float32, 8192), ("fp64_gemm_tflops", torch.float64, 4096)):
        n = n if TORCH_DEV != "cpu" else 512
        a = torch.randn(n, n, device=TORCH_DEV, dtype=dtype)
        b = torch.randn(n, n, device=TORCH_DEV, dtype=dtype)
        out[name] = round(2 * n**3 / cuda_time(torch, lambda: a @ b) / 1e12, 2)
    if TORCH_DEV != "cpu":
        h = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
        d = torch.empty(1 << 28, dtype=torch.uint8, device=TORCH_DEV)
        out["h2d_pinned_gbs"] = round((1 << 28) / cuda_time(torch, lambda: d.copy_(h, non_blocking=True)) / 1e9, 1)
    return out


def part_analyze(args) -> dict:
    import numpy as np
    import torch

    import pysafe
    from bench_analyze import pair_tensors

    pair = Path(args.data_dir)
    t0 = time.time()
    pysafe.make_pair(pair, args.preset, layers=args.layers)
    out = RESULTS["analyze"] = {"preset": args.preset, "layers": args.layers, "rank": args.rank,
                                "make_pair_s": round(time.time() - t0, 1)}  # saved as it fills
    kw = dict(rank=args.rank, base_rank=args.rank, exact_max_dim=0, spectrum="none")
    runs = {}
    for device in (ENGINE_DEV, "cpu") if ENGINE_DEV != "cpu" else ("cpu",):
        t0 = time.perf_counter()
        runs[device] = pysafe.compare(pair / "base", pair / "tuned", device=device, **kw)
        out[f"{device}_s"] = round(time.perf_counter() - t0, 2)
        save(Path(args.out))
    g, c = runs[ENGINE_DEV], runs["cpu"]
    out["tensors"] = len(g.records)
    out["gb_read"] = round(g.bytes_read / 1e9, 3)
    out["speedup_vs_cpu"] = round(out["cpu_s"] / out[f"{ENGINE_DEV}_s"], 2)
    out["peak_device_gib"] = round(g.device["peak_bytes"] / 2**30, 3) if g.device else None
    diffs = {}
    for rc, rg in zip(c.records, g.records):
        for key in ("delta_rel", "null_frac_left", "null_frac_right", "overlap_left", "overlap_right",
                    "sin_theta_left"):
            a, b = rc.get(key), rg.get(key)
            if isinstance(a, float) and isinstance(b, float) and a == a and b == b:
                diffs[key] = max(diffs.get(key, 0.0), abs(a - b))
        for key in ("sv_delta", "sv_base"):
            a, b = np.asarray(rc.get(key, [])), np.asarray(rg.get(key, []))
            n = min(len(a), len(b))
            if n and a[0] > 0:  # (a matrix that did not change has no singular values to compare)
                diffs[key + "_rel"] = max(diffs.get(key + "_rel", 0.0), float(np.max(np.abs(a[:n] - b[:n]) / a[0])))
    out["cpu_vs_gpu_max_abs_diff"] = {k: float(f"{v:.3g}") for k, v in diffs.items()}
    # torch on the GPU, at equal accuracy, on the largest matrices (an MLP and the lm_head/embedding)
    recs = {r["name"]: r for r in g.records}
    names = sorted((n for n in recs if (recs[n].get("delta_rel") or 0) > 0),  # matrices that changed
                   key=lambda n: -np.prod(recs[n]["stored_shape"]))
    sample = [n for n in names if "mlp" in n][:1] + [n for n in names if "mlp" not in n][:1]
    k = args.rank
    per = []
    for name, wb, wt in pair_tensors(pair / "base", pair / "tuned"):
        if name not in sample:
            continue
        d = wt.to(TORCH_DEV).float() - wb.to(TORCH_DEV).float()
        ref = torch.linalg.svdvals(d.double())[:k].cpu().numpy()
        row = {"name": name, "shape": list(d.shape)}
        mine = np.asarray(recs[name]["sv_delta"][:k])
        row["pysafe_gpu_err"] = float(np.max(np.abs(mine - ref) / ref[0]))
        for niter in (2, 4, 8):
            torch.manual_seed(0)
            t = cuda_time(torch, lambda: torch.svd_lowrank(d, q=k + 10, niter=niter), reps=2)
            torch.manual_seed(0)
            s = torch.svd_lowrank(d, q=k + 10, niter=niter)[1][:k].double().cpu().numpy()
            row[f"svd_lowrank_niter{niter}"] = {"s": round(t, 4), "err": float(np.max(np.abs(s - ref) / ref[0]))}
        t = cuda_time(torch, lambda: torch.linalg.svd(d, full_matrices=False), reps=1)
        s = torch.linalg.svdvals(d)[:k].double().cpu().numpy()
        row["linalg_svd"] = {"s": round(t, 4), "err": float(np.max(np.abs(s - ref) / ref[0]))}
        matched = [n for n in (2, 4, 8) if row[f"svd_lowrank_niter{n}"]["err"] <= 1.1 * row["pysafe_gpu_err"] + 1e-7]
        row["svd_lowrank_niter_matching_pysafe"] = matched[0] if matched else None
        per.append(row)
        del d
        if TORCH_DEV != "cpu":
            torch.cuda.empty_cache()
    out["torch_sample"] = per
    return out


def part_distances(args) -> dict:
    import numpy as np
    import torch

    import pysafe

    torch.backends.cuda.matmul.allow_tf32 = False
    n, d = args.dist_n, args.dist_d
    g = torch.Generator(device=TORCH_DEV).manual_seed(0)
    xa = torch.randn(n, d, device=TORCH_DEV, generator=g) + 3.0
    xb = torch.randn(n, d, device=TORCH_DEV, generator=g) + 3.0
    a, b = xa.cpu().numpy(), xb.cpu().numpy()
    out = {"n": n, "m": n, "d": d}
    t0 = time.perf_counter()
    D = pysafe.pairwise_distances(a, b, device=ENGINE_DEV)
    out["pysafe_gpu_s"] = round(time.perf_counter() - t0, 3)  # host in, host out (includes both copies)
    if ENGINE_DEV != "cpu":  # the same inputs already on the GPU: used in place (prepared there), host out
        from pysafe import _core

        # torch's CUDA tensors; with the emulator (torch on the CPU), copies in the engine's device memory
        ra, rb = (xa, xb) if TORCH_DEV != "cpu" else (_core.backend.device_array(0, a), _core.backend.device_array(0, b))
        t0 = time.perf_counter()
        Dr = pysafe.pairwise_distances(ra, rb, device=ENGINE_DEV)
        out["pysafe_gpu_resident_s"] = round(time.perf_counter() - t0, 3)
        out["resident_vs_host_max_abs_diff"] = float(np.max(np.abs(Dr - D)))
        del Dr
    out["torch_cdist_s"] = round(cuda_time(torch, lambda: torch.cdist(xa, xb), reps=2), 3)  # device in, device out
    out["gemm_equivalent_tflops_pysafe"] = round(2 * n * n * d / out["pysafe_gpu_s"] / 1e12, 2)
    rows = np.random.default_rng(0).choice(n, 200, replace=False)
    sel = torch.as_tensor(rows, device=TORCH_DEV)
    ref = torch.cdist(xa[sel].double(), xb.double(), compute_mode="donot_use_mm_for_euclid_dist").cpu().numpy()
    out["pysafe_max_rel_err"] = float(np.max(np.abs(D[rows] - ref) / ref))
    C = torch.cdist(xa[sel], xb).cpu().numpy()
    out["cdist_max_rel_err"] = float(np.max(np.abs(C - ref) / ref))
    t0 = time.perf_counter()
    pysafe.pairwise_distances(a, b)
    out["pysafe_cpu_s"] = round(time.perf_counter() - t0, 3)
    return out


def part_lab(args) -> dict:
    from pysafe.lab.config import stage_settings
    from pysafe.lab.train import train

    settings = stage_settings("paper", "pretrain", steps=args.lab_steps, batch_size=args.lab_batch)
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        train("pretrain", Path(tmp) / "run", model_config=settings.model, recipe=settings.recipe,
              train_config=settings.train, device=TORCH_DEV, preset=settings.preset_name,
              callback=lambda step, model: stamps.append((step, time.perf_counter())))
    warm = min(20, len(stamps) - 3)
    (s0, t0), (s1, t1) = stamps[warm], stamps[-2]  # the last step's stamp includes the final evaluation
    return {"preset": "paper", "steps": args.lab_steps, "batch_size": settings.train.batch_size,
            "steps_per_s": round((s1 - s0) / (t1 - t0), 2), "measured_steps": s1 - s0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu_check.json")
    p.add_argument("--deadline", type=float, default=time.time() + 360, help="epoch seconds: stop starting parts")
    p.add_argument("--preset", default="medium")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "pysafe-gpu-pair"))
    p.add_argument("--dist-n", type=int, default=20000)
    p.add_argument("--dist-d", type=int, default=1024)
    p.add_argument("--lab-steps", type=int, default=300)
    p.add_argument("--lab-batch", type=int, default=None, help="batch size (default: the paper preset's)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "emulated"],
                   help="cpu (everything) or emulated (torch on the CPU, pysafe on its CUDA emulator build): "
                        "smoke tests of this script without a GPU")
    args = p.parse_args(argv)
    global TORCH_DEV, ENGINE_DEV
    TORCH_DEV = "cpu" if args.device != "cuda" else "cuda"
    ENGINE_DEV = "cpu" if args.device == "cpu" else "cuda"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        RESULTS.update(json.loads(out.read_text()))
    run_part("env", 5, args.deadline, out, part_env)
    run_part("rates", 15, args.deadline, out, part_rates)
    run_part("analyze", 120, args.deadline, out, part_analyze, args)
    run_part("distances", 40, args.deadline, out, part_distances, args)
    run_part("lab", 60, args.deadline, out, part_lab, args)


if __name__ == "__main__":
    main()

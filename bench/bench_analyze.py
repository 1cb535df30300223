"""Benchmark `pysafe.compare` against the script a user would write today (engine.md §7).

On one synthetic Llama-shaped bf16 pair (pysafe.make_pair) this measures, each tool in its own
subprocess so that its peak RSS is its own:
  - pysafe: `pysafe.compare(base, tuned, rank=K, base_rank=Kb)`;
  - baseline: per tensor, `safetensors.safe_open(framework="pt").get_tensor`, `.float()` subtraction,
    `torch.svd_lowrank(q=k+p, niter=q)` of ΔW and of W_base, and the engine.md §5 metrics in torch;
and next to them the machine's own limits: sequential read GB/s (cold, page cache dropped, and warm)
and the sgemm rate (torch and NumPy/OpenBLAS), so the run can be compared with the floor
max(B / read bandwidth, flops / sgemm rate). Accuracy is matched on a few matrices against exact f64
singular values. One JSON line per result, then a summary line (speedup, RSS ratio, verdict).

    python bench/bench_analyze.py                        # small preset, both tools
    python bench/bench_analyze.py --preset tiny --threads 1
    python bench/bench_analyze.py --preset llama2-7b --tool pysafe --data-dir /data/pair7b
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# --- knobs (nanoGPT style; each is overridable on the command line: --preset tiny --threads 1 ...) ---
preset = "small"          # synthetic pair preset of pysafe.make_pair: tiny, small, medium, llama2-7b
layers = None             # override the preset's number of layers (None: the preset's own)
rank = 64                 # fixed k of ΔW's truncated SVD, both tools
base_rank = 64            # fixed k of W_base's top-k subspace, both tools
oversample = 10           # randomized SVD oversampling p, both tools (svd_lowrank q = k + p)
power_iters = 2           # randomized SVD power iterations, both tools (svd_lowrank niter)
exact_max_dim = 0         # pysafe exact SVD when min(out, in) <= this: 0 = randomized like the baseline, -1 = default
threads = 2               # threads for pysafe's core/OpenBLAS and for torch (0: all cores)
data_dir = None           # where the pair lives (None: bench/data/pair-<preset>[-L<layers>])
reuse = True              # reuse the pair in data_dir when it is there (--no-reuse deletes and regenerates it)
include = None            # regex: only tensors whose name matches, both tools
tool = "both"             # which tools to run: pysafe, baseline or both
skip_baseline = False     # same as --tool pysafe
accuracy_sample = 3       # matrices checked against exact f64 singular values (0: skip the check)
cold = True               # drop the pair from the page cache before each tool run (--no-cold: whatever is cached)
read_probe_mb = 2048      # at most this many MB read by each read-bandwidth probe (cold, then warm)
sgemm_n = 4096            # size of the square f32 matmul that measures the sgemm rate
results = None            # also append the JSON lines to this file (e.g. bench/results/analyze.jsonl)
target_speedup = 1.5      # the verdict's bar: baseline seconds / pysafe seconds

REPO = Path(__file__).resolve().parent.parent


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=preset, choices=["tiny", "small", "medium", "llama2-7b"])
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--rank", type=int, default=rank)
    p.add_argument("--base-rank", type=int, default=base_rank)
    p.add_argument("--oversample", type=int, default=oversample)
    p.add_argument("--power-iters", type=int, default=power_iters)
    p.add_argument("--exact-max-dim", type=int, default=exact_max_dim)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--data-dir", default=data_dir)
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=reuse)
    p.add_argument("--include", default=include)
    p.add_argument("--tool", default=tool, choices=["pysafe", "baseline", "both"])
    p.add_argument("--skip-baseline", action="store_true", default=skip_baseline)
    p.add_argument("--accuracy-sample", type=int, default=accuracy_sample)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=cold)
    p.add_argument("--read-probe-mb", type=int, default=read_probe_mb)
    p.add_argument("--sgemm-n", type=int, default=sgemm_n)
    p.add_argument("--results", default=results)
    p.add_argument("--target-speedup", type=float, default=target_speedup)
    # internal: a measurement subprocess (machine, pysafe or baseline) and its JSON config file
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def resolve_threads(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "--short", "HEAD") or None,
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"git_commit": None, "git_dirty": None}


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def vm_status(key: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def busy_warning(what: str) -> float | None:
    """The 1-minute load average; warns on stderr when other work shares the cores (timings unreliable)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load > 0.5:
        print(f"warning: load average {load:.2f} before {what}: other processes share the cores, so these "
              "timings (and especially multi-threaded OpenBLAS ones) are unreliable", file=sys.stderr)
    return load


def emit(rec: dict, results_path: str | None) -> None:
    line = json.dumps(rec, sort_keys=False)
    print(line, flush=True)
    if results_path:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        with open(results_path, "a") as f:
            f.write(line + "\n")


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(x, nd)


# ------------------------------------------------------------------------------------------------
# The pair: generation, headers, sample choice, flop model
# ------------------------------------------------------------------------------------------------

def default_data_dir(preset_: str, layers_: int | None) -> Path:
    return REPO / "bench" / "data" / (f"pair-{preset_}" + (f"-L{layers_}" if layers_ else ""))


def ensure_pair(out: Path, preset_: str, layers_: int | None, reuse_: bool) -> tuple[Path, float]:
    """Generate the pair into `out` (or reuse it); returns (out, seconds spent generating)."""
    import pysafe

    if not reuse_:
        for side in ("base", "tuned"):
            d = out / side
            if d.exists():
                cfg = d / "config.json"
                if not (cfg.exists() and "pysafe_synthetic" in cfg.read_text()):
                    sys.exit(f"--no-reuse: {d} is not a pysafe synthetic checkpoint; refusing to delete it")
                shutil.rmtree(d)
    t0 = time.perf_counter()
    try:
        pysafe.make_pair(out, preset_, layers=layers_)
    except FileExistsError as exc:
        sys.exit(f"{exc}\n(pass --no-reuse to regenerate it, or another --data-dir)")
    return out, time.perf_counter() - t0


def read_st_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
              "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def side_tensors(side: Path) -> dict:
    """name -> {file, dtype, shape, nbytes} for a sharded (index) or single-file checkpoint."""
    idx = side / "model.safetensors.index.json"
    files = sorted({v for v in json.loads(idx.read_text())["weight_map"].values()}) if idx.exists() \
        else [p.name for p in sorted(side.glob("*.safetensors"))]
    out = {}
    for fn in files:
        for name, e in read_st_header(side / fn).items():
            out[name] = {"file": str(side / fn), "dtype": e["dtype"], "shape": list(e["shape"]),
                         "nbytes": e["data_offsets"][1] - e["data_offsets"][0]}
    return out


def shard_files(pair: Path) -> list[str]:
    return [str(p) for side in ("base", "tuned") for p in sorted((pair / side).glob("*.safetensors"))]


def _kind(name: str) -> str:
    if re.search(r"mlp|feed_forward|c_fc", name):
        return "mlp"
    if re.search(r"attn|attention", name):
        return "attn"
    return "other"


def pick_sample(mats: dict, n: int) -> list[str]:
    """n matrices, deterministically: the largest of each kind, mlp and attn alternately (other
    matrices only when there is neither), spread over layers by a seeded shuffle."""
    groups = {}
    for kind in ("mlp", "attn", "other"):
        names = [nm for nm in mats if _kind(nm) == kind]
        if not names or (kind == "other" and groups):
            continue
        big = max(math.prod(mats[nm]) for nm in names)
        cand = sorted(nm for nm in names if math.prod(mats[nm]) == big)
        random.Random(0).shuffle(cand)
        groups[kind] = cand
    out = []
    while len(out) < n and any(groups.values()):
        for kind in list(groups):
            if groups[kind] and len(out) < n:
                out.append(groups[kind].pop(0))
    return out


def flop_model(mats: dict, k: int, kb: int, p: int, q: int) -> float:
    """engine.md §7: per m×n matrix, 2mn(k+p)(2q+2) for ΔW's randomized SVD and the same for W_base's
    (with l = min(k+p, min(m, n))), plus 2·mn·k_b·2 for the two projections of ΔW on W_base's subspaces."""
    total = 0.0
    for m, n in mats.values():
        d = min(m, n)
        total += 2.0 * m * n * min(k + p, d) * (2 * q + 2)
        total += 2.0 * m * n * min(kb + p, d) * (2 * q + 2)
        total += 2.0 * m * n * min(kb, d) * 2
    return total


def shapes_summary(mats: dict) -> dict:
    c = Counter(f"{m}x{n}" for m, n in mats.values())
    return dict(sorted(c.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------------
# Page cache
# ------------------------------------------------------------------------------------------------

def drop_cache(paths) -> None:
    """Drop the files' pages from the page cache (flushing dirty pages first, else they stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths) -> float | None:
    """Share of the files' pages in the page cache (mincore); None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    res = tot = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            npages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * npages)()
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                return None
            res += sum(v & 1 for v in vec)
            tot += npages
        finally:
            os.close(fd)
    return res / tot if tot else None


def read_files(paths, cap_bytes: int, chunk: int = 64 << 20) -> tuple[int, float]:
    """Read the files front to back with large reads, up to cap_bytes in all; returns (bytes, seconds)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    done = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while done < cap_bytes:
                n = f.readinto(view[: min(chunk, cap_bytes - done)])
                if not n:
                    break
                done += n
        if done >= cap_bytes:
            break
    return done, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Workers (each runs in its own subprocess)
# ------------------------------------------------------------------------------------------------

def worker_machine(cfg: dict) -> dict:
    """Sequential read GB/s (cold and warm) over the pair's shards, and the f32 sgemm rate."""
    files = cfg["files"]
    cap = int(cfg["read_probe_mb"] * 1e6)
    drop_cache(files)
    resident = resident_fraction(files)
    cold_b, cold_s = read_files(files, cap)
    read_files(files, cap)  # make sure the probed range is cached, then time a warm pass
    warm_b, warm_s = read_files(files, cap)
    out = {"read_cold_gbps": cold_b / cold_s / 1e9, "read_warm_gbps": warm_b / warm_s / 1e9,
           "read_probe_bytes": cold_b, "cache_resident_after_drop": resident}

    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    n = cfg["sgemm_n"]
    flops = 2.0 * n ** 3

    def best_of(f, reps=3):
        f()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best

    a, b = torch.randn(n, n), torch.randn(n, n)
    out["sgemm_gflops_torch"] = flops / best_of(lambda: torch.matmul(a, b)) / 1e9
    an, bn = a.numpy(), b.numpy()
    out["sgemm_gflops_numpy"] = flops / best_of(lambda: np.dot(an, bn)) / 1e9
    out["sgemm_gflops"] = max(out["sgemm_gflops_torch"], out["sgemm_gflops_numpy"])
    out["torch"] = torch.__version__
    out["numpy"] = np.__version__
    return out


def worker_pysafe(cfg: dict) -> dict:
    import numpy as np

    import pysafe

    opts = dict(rank=cfg["rank"], base_rank=cfg["base_rank"], threads=cfg["threads"], include=cfg["include"],
                oversample=cfg["oversample"], power_iters=cfg["power_iters"])
    if cfg["exact_max_dim"] >= 0:
        opts["exact_max_dim"] = cfg["exact_max_dim"]
    # warm-up: load the core and OpenBLAS, start its threads (on a synthetic matrix: no file page touched)
    pysafe._core.set_num_threads(cfg["threads"])
    pysafe.truncated_svd(np.random.default_rng(0).standard_normal((256, 512), dtype=np.float32), rank=16,
                         exact_max_dim=0)
    rss0 = vm_status("VmRSS")
    t0 = time.perf_counter()
    cmp = pysafe.compare(cfg["base"], cfg["tuned"], **opts)
    seconds = time.perf_counter() - t0
    sample = {}
    for r in cmp.records:
        if r["name"] in cfg["sample"]:
            sample[r["name"]] = {"sv_delta": [float(x) for x in r["sv_delta"][: r["rank_delta"]]],
                                 "sv_base": [float(x) for x in r["sv_base"][: r["rank_base"]]],
                                 **{k: float(r[k]) for k in ("null_frac_left", "null_frac_right", "overlap_left",
                                                             "overlap_right")}}
    phases = Counter()
    for r in cmp.records:
        for k in ("time_read_delta", "time_svd_delta", "time_svd_base", "time_metrics"):
            phases[k] += float(r.get(k, 0.0) or 0.0)
    return {"seconds": seconds, "bytes_read": int(cmp.bytes_read), "n_records": len(cmp.records),
            "svd_methods": dict(Counter(r.get("svd_method", "norms") for r in cmp.records)),
            "phase_seconds": {k: round(v, 4) for k, v in phases.items()},
            "rss_after_import_mb": rss0, "sample": sample}


def pair_tensors(base_dir, tuned_dir, include=None):
    """(name, base tensor, tuned tensor) for every tensor both sharded checkpoints hold (and ``include``, a
    compiled regex, matches), each read with the safetensors library as a user's script does."""
    from safetensors import safe_open

    base_dir, tuned_dir = Path(base_dir), Path(tuned_dir)
    base_map = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tuned_map = json.loads((tuned_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name, bfile in base_map.items():
        if name not in tuned_map or (include and not include.search(name)):
            continue
        with safe_open(str(base_dir / bfile), framework="pt") as f:
            wb = f.get_tensor(name)
        with safe_open(str(tuned_dir / tuned_map[name]), framework="pt") as f:
            wt = f.get_tensor(name)
        yield name, wb, wt


def worker_baseline(cfg: dict) -> dict:
    """What a user writes today: safetensors + torch, tensor by tensor."""
    import torch

    torch.set_num_threads(cfg["threads"])
    k, kb, p, q = cfg["rank"], cfg["base_rank"], cfg["oversample"], cfg["power_iters"]
    torch.svd_lowrank(torch.randn(256, 512), q=16 + p, niter=q)  # warm-up: torch's kernels and threads
    rss0 = vm_status("VmRSS")
    inc = re.compile(cfg["include"]) if cfg["include"] else None

    t0 = time.perf_counter()
    records, nbytes, sample = {}, 0, {}
    for name, wb, wt in pair_tensors(cfg["base"], cfg["tuned"], inc):
        nbytes += wb.numel() * wb.element_size() + wt.numel() * wt.element_size()
        Wb = wb.float()
        dW = wt.float() - Wb
        del wb, wt
        rec = {"delta_fro": dW.norm().item(), "delta_rel": (dW.norm() / Wb.norm()).item()}
        if dW.ndim == 2:
            m, n = dW.shape
            d = min(m, n)
            kd_, kb_ = min(k, d), min(kb, d)
            dfro2 = dW.square().sum()
            Ub, Sb, Vb = torch.svd_lowrank(Wb, q=min(kb + p, d), niter=q)
            Ub, Vb = Ub[:, :kb_], Vb[:, :kb_]
            rec["sv_base"] = Sb[:kb_]
            if dfro2 > 0:  # an all-zero ΔW (untouched embeddings) has no subspace to compare
                Ud, Sd, Vd = torch.svd_lowrank(dW, q=min(kd_ + p, d), niter=q)
                Ud, Vd = Ud[:, :kd_], Vd[:, :kd_]
                rec["sv_delta"] = Sd[:kd_]
                rec["null_frac_left"] = ((dW - Ub @ (Ub.T @ dW)).square().sum() / dfro2).item()
                rec["null_frac_right"] = ((dW - (dW @ Vb) @ Vb.T).square().sum() / dfro2).item()
                C = Ub.T @ Ud
                rec["sin_theta_left"] = (Ud - Ub @ C).norm(dim=0).clamp(max=1.0)
                kmin = min(kb_, kd_)
                rec["overlap_left"] = (C.square().sum() / kmin).item()
                rec["overlap_right"] = ((Vb.T @ Vd).square().sum() / kmin).item()
        records[name] = rec
        if name in cfg["sample"] and "sv_delta" in rec:
            sample[name] = {"sv_delta": rec["sv_delta"].tolist(), "sv_base": rec["sv_base"].tolist(),
                            **{key: rec[key] for key in ("null_frac_left", "null_frac_right", "overlap_left",
                                                         "overlap_right")}}
        del Wb, dW
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes_read": nbytes, "n_records": len(records),
            "rss_after_import_mb": rss0, "sample": sample}


WORKERS = {"machine": worker_machine, "pysafe": worker_pysafe, "baseline": worker_baseline}


def run_worker(kind: str, cfg: dict, script: str | None = None, cwd_tmp: bool = False) -> dict:
    """Run one worker in a fresh interpreter (``script --_worker KIND``, this file by default; in its
    temporary directory with ``cwd_tmp``); adds its peak RSS and wall time."""
    with tempfile.TemporaryDirectory(prefix="pysafe-bench-") as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps({**cfg, "out": str(out_path)}))
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(cfg["threads"])
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(script or __file__).resolve()), "--_worker", kind,
                                 "--_config", str(cfg_path)], env=env, cwd=tmp if cwd_tmp else None)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{kind} worker failed with exit code {proc.returncode}")
        out = json.loads(out_path.read_text())
    # The child's own high-water mark (VmHWM, reset at exec). wait4's ru_maxrss is not used where
    # VmHWM exists: Linux carries the forking parent's RSS into it, so it would count this script.
    out["peak_rss_mb"] = out.get("vm_hwm_mb") or ru.ru_maxrss / 1024.0
    out["process_seconds"] = wall
    return out


def worker_main(kind: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    out = WORKERS[kind](cfg)
    out["vm_hwm_mb"] = vm_status("VmHWM")
    Path(cfg["out"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# Accuracy against exact f64 singular values
# ------------------------------------------------------------------------------------------------

def exact_spectra(base: dict, tuned: dict, names: list[str], kmax: int) -> dict:
    import torch
    from safetensors import safe_open

    out = {}
    for name in names:
        with safe_open(base[name]["file"], framework="pt") as f:
            wb = f.get_tensor(name).double()
        with safe_open(tuned[name]["file"], framework="pt") as f:
            wt = f.get_tensor(name).double()
        out[name] = {"sv_delta": torch.linalg.svdvals(wt - wb)[:kmax].tolist(),
                     "sv_base": torch.linalg.svdvals(wb)[:kmax].tolist()}
    return out


def sv_errors(sample: dict, exact: dict, key: str) -> tuple[float | None, float | None]:
    """(max_i |σ̂_i − σ_i| / σ_i, max_i |σ̂_i − σ_i| / σ_1) over the sample's top-k values."""
    rel = rel1 = None
    for name, ex in exact.items():
        got = sample.get(name, {}).get(key)
        if not got:
            continue
        k = min(len(got), len(ex[key]))
        for i in range(k):
            e = abs(got[i] - ex[key][i])
            if ex[key][i] > 0:
                rel = max(rel or 0.0, e / ex[key][i])
            if ex[key][0] > 0:
                rel1 = max(rel1 or 0.0, e / ex[key][0])
    return rel, rel1


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def prepare(args) -> dict:
    """Pair on disk, its matrices, sample names, flop model: shared by bench_analyze and bench_rss_scaling."""
    pair = Path(args.data_dir) if args.data_dir else default_data_dir(args.preset, args.layers)
    pair, gen_s = ensure_pair(pair, args.preset, args.layers, args.reuse)
    base, tuned = side_tensors(pair / "base"), side_tensors(pair / "tuned")
    inc = re.compile(args.include) if args.include else None
    common = [n for n in base if n in tuned and (inc is None or inc.search(n))]
    if not common:
        sys.exit(f"no tensor selected (--include {args.include!r})")
    mats = {n: tuple(base[n]["shape"]) for n in common if len(base[n]["shape"]) == 2}
    nbytes = sum(base[n]["nbytes"] + tuned[n]["nbytes"] for n in common)
    return {"pair": pair, "generate_seconds": gen_s, "base": base, "tuned": tuned, "mats": mats,
            "n_vectors": len(common) - len(mats), "bytes": nbytes,
            "flops": flop_model(mats, args.rank, args.base_rank, args.oversample, args.power_iters)}


def worker_cfg(args, info: dict, sample: list[str]) -> dict:
    return {"base": str(info["pair"] / "base"), "tuned": str(info["pair"] / "tuned"),
            "files": shard_files(info["pair"]), "rank": args.rank, "base_rank": args.base_rank,
            "oversample": args.oversample, "power_iters": args.power_iters, "exact_max_dim": args.exact_max_dim,
            "threads": resolve_threads(args.threads), "include": args.include, "sample": sample,
            "read_probe_mb": args.read_probe_mb, "sgemm_n": args.sgemm_n}


def common_fields(args, info: dict) -> dict:
    return {"bench": "analyze", "preset": args.preset, "layers": args.layers, "device": "cpu",
            "dtype": "bf16 in, f32 compute", "shapes": shapes_summary(info["mats"]),
            "n_matrices": len(info["mats"]), "n_vectors": info["n_vectors"],
            "threads": resolve_threads(args.threads), "rank": args.rank, "base_rank": args.base_rank,
            "oversample": args.oversample, "power_iters": args.power_iters}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args._worker:
        worker_main(args._worker, args._config)
        return
    tools = ["pysafe", "baseline"] if args.tool == "both" else [args.tool]
    if args.skip_baseline:
        tools = [t for t in tools if t != "baseline"]
    if not tools:
        sys.exit("nothing to run (--tool baseline with --skip-baseline)")
    info = prepare(args)
    sample = pick_sample(info["mats"], args.accuracy_sample) if args.accuracy_sample > 0 else []
    cfg = worker_cfg(args, info, sample)
    env = {**git_info(), "cpu": cpu_model(), "ncpu": os.cpu_count()}
    common = common_fields(args, info)

    busy_warning("the machine probe")
    machine = run_worker("machine", cfg)
    emit({**common, "tool": "machine", **{k: _r(v) if isinstance(v, float) else v for k, v in machine.items()
                                         if k not in ("peak_rss_mb", "process_seconds", "vm_hwm_mb")},
          "pair_bytes": info["bytes"], "generate_seconds": _r(info["generate_seconds"], 2), **env}, args.results)
    floor = max(info["bytes"] / (machine["read_cold_gbps"] * 1e9), info["flops"] / (machine["sgemm_gflops"] * 1e9))

    runs = {}
    for t in tools:
        resident = None
        if args.cold:
            drop_cache(cfg["files"])
            resident = resident_fraction(cfg["files"])
        load = busy_warning(t)
        runs[t] = run_worker(t, cfg)
        runs[t]["cache_resident_at_start"] = resident
        runs[t]["loadavg_1m_at_start"] = load

    exact = exact_spectra(info["base"], info["tuned"], sample, max(args.rank, args.base_rank)) if sample else {}
    for t, r in runs.items():
        err_d, err_d1 = sv_errors(r["sample"], exact, "sv_delta")
        err_b, err_b1 = sv_errors(r["sample"], exact, "sv_base")
        r["sv_rel_err_delta"], r["sv_rel_err_base"] = err_d, err_b
        rec = {**common, "tool": t, "seconds": _r(r["seconds"], 3), "process_seconds": _r(r["process_seconds"], 3),
               "peak_rss_mb": _r(r["peak_rss_mb"], 1), "rss_after_import_mb": _r(r["rss_after_import_mb"], 1),
               "bytes_read": r["bytes_read"], "read_gbps": _r(r["bytes_read"] / r["seconds"] / 1e9),
               "read_cold_gbps": _r(machine["read_cold_gbps"]), "sgemm_gflops": _r(machine["sgemm_gflops"], 1),
               "flops": info["flops"], "achieved_gflops": _r(info["flops"] / r["seconds"] / 1e9, 2),
               "floor_seconds": _r(floor, 3), "x_floor": _r(r["seconds"] / floor, 2),
               "sv_rel_err_delta": _r(err_d, 6), "sv_rel_err_base": _r(err_b, 6),
               "sv_err_delta_over_s1": _r(err_d1, 6), "sv_err_base_over_s1": _r(err_b1, 6),
               "accuracy_sample": sample, "n_records": r["n_records"],
               "cache_resident_at_start": _r(r["cache_resident_at_start"]),
               "loadavg_1m_at_start": _r(r["loadavg_1m_at_start"], 2)}
        if t == "pysafe":
            rec["svd_methods"] = r["svd_methods"]
            rec["phase_seconds"] = r["phase_seconds"]
            rec["exact_max_dim"] = args.exact_max_dim if args.exact_max_dim >= 0 else "default"
        emit({**rec, **env}, args.results)

    summary = {**common, "tool": "summary", "target_speedup": args.target_speedup, **env}
    if "pysafe" in runs and "baseline" in runs:
        ps, bl = runs["pysafe"], runs["baseline"]
        speedup = bl["seconds"] / ps["seconds"]
        rss_ratio = bl["peak_rss_mb"] / ps["peak_rss_mb"]
        # matched accuracy: pysafe's top-k singular values no worse than the baseline's (10% slack + 1e-4)
        matched = all(a is None or b is None or a <= 1.1 * b + 1e-4
                      for a, b in ((ps["sv_rel_err_delta"], bl["sv_rel_err_delta"]),
                                   (ps["sv_rel_err_base"], bl["sv_rel_err_base"])))
        diffs = [abs(ps["sample"][n][key] - bl["sample"][n][key]) for n in sample
                 if n in ps["sample"] and n in bl["sample"]
                 for key in ("null_frac_left", "null_frac_right", "overlap_left", "overlap_right")]
        ok = speedup >= args.target_speedup and matched
        verdict = (f"{'PASS' if ok else 'FAIL'}: pysafe {speedup:.2f}x the baseline's speed "
                   f"(target {args.target_speedup}x), accuracy {'matched' if matched else 'NOT matched'}, "
                   f"peak RSS {ps['peak_rss_mb']:.0f} MB vs {bl['peak_rss_mb']:.0f} MB")
        summary.update({"speedup": _r(speedup, 3), "rss_ratio": _r(rss_ratio, 3), "accuracy_matched": matched,
                        "metrics_max_abs_diff": _r(max(diffs), 6) if diffs else None,
                        "pysafe_x_floor": _r(ps["seconds"] / floor, 2), "verdict": verdict})
    else:
        summary.update({"speedup": None, "rss_ratio": None, "verdict": "n/a: run --tool both for a verdict"})
    emit(summary, args.results)


if __name__ == "__main__":
    main()

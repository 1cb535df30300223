"""pysafe beside its peers on one realistic pair, in one run: time, peak RSS, accuracy, and the machine floor.

The pair: W_base from `pysafe.make_pair(preset)` (bf16, sharded, Llama-shaped) and a tuned side whose ΔW is
full rank with a power-law spectrum σ_i ∝ i^-alpha (alpha = 0.6, as full fine-tunes have), stored as
bf16(W_base + ΔW), ‖ΔW‖_F = delta_scale · ‖W_base‖_F, every 2-D tensor changed.

Each tool runs in its own fresh subprocess (peak RSS = that child's VmHWM), after the pair is dropped from
the page cache (when `cold`):

  (a) fixed ranks: pysafe `compare(rank=8, base_rank=64)` vs the user's script (per 2-D tensor: load both
      sides with safetensors, ΔW in f32, `torch.svd_lowrank(ΔW, q=8+p, niter=4)` and
      `torch.svd_lowrank(W_base, q=64+p, niter=4)`); time, RSS, and each tool's top-k singular values
      against an exact float64 SVD on a sample of matrices;
  (b) modeldelta's numbers: `modeldelta.core.weight_diff.compare_models` (what `modeldelta A B` runs:
      full `svdvals` of every ΔW) vs pysafe asked for the same quantities (`rank=20`, modeldelta's top-k,
      and the smallest base rank); per matrix agreement of relative norm, top-20 σ and top-20 energy
      concentration (1e-3 relative), and each tool's effective rank against the exact float64 spectrum
      (modeldelta's is exp H(σ/Σσ), pysafe's exp H(σ²/Σσ²): different definitions, so each is checked
      against its own exact value); the full default `pysafe.compare` is timed beside;
  (c) the floor max(bytes / read bandwidth, flops / sgemm rate) of the algorithm each pysafe run actually
      ran (flops counted from its records: method, sketch width, passes), and achieved / floor.

Output: one JSON line per result on stdout (and appended to `results` when given), then a markdown table.

    python bench/bench_peers.py                                  # medium preset: the numbers to publish
    python bench/bench_peers.py --preset small --threads 1       # validation, a few minutes
    python bench/bench_peers.py --preset llama2-7b --data-dir /data/peers7b --skip modeldelta
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_analyze as ba  # noqa: E402  (shared helpers: page cache, read probe, sgemm probe, headers)

# --- knobs (each is also a command-line flag: --preset small --threads 1 ...) ---
preset = "medium"          # make_pair preset of W_base: tiny, small, medium, llama2-7b
layers = None              # override the preset's number of layers
base_spectrum = "gaussian"  # W_base: make_pair's "gaussian" (flat at the top: the worst case) or "powerlaw:A"
alpha = 0.6                # ΔW spectrum σ_i ∝ i^-alpha over all min(m, n) values (full rank)
delta_scale = 0.02         # ‖ΔW‖_F / ‖W_base‖_F per matrix
seed = 0                   # seed of ΔW's singular vectors
generator = "auto"         # who writes the power-law ΔW: "pysafe" (make_pair's delta_spectrum option, where this
                           # build has it), "bench" (this script), "auto" (pysafe if it can, else bench)
data_dir = None            # where the pair lives (default bench/data/peers-<preset>[-L<layers>]-a<alpha>)
threads = 2                # threads of every tool (0: all cores)
rank = 8                   # (a) ΔW's k
base_rank = 64             # (a) W_base's k
niter = 4                  # (a) torch.svd_lowrank power iterations of the user's script
oversample = 10            # (a) p of svd_lowrank's q = k + p (pysafe uses its own default unless --pysafe-oversample)
md_top_k = 20              # (b) modeldelta's --top-k (its default)
tol = None                 # pysafe --tol when this build has it (None: pysafe's default)
matched_tol = 5e-2         # (a) pysafe_topk_matched's tol: about the error torch's niter=4 script reaches on a
                           # flat W_base's top 64 (6.4e-2 measured), so that pysafe is timed at matched accuracy
base_tol = 5e-2            # (a) pysafe_topk_basetol: ΔW at pysafe's --tol, W_base at this bound (--base-tol)
repeat = 1                 # run the tools' sequence this many times, interleaved; keep each tool's fastest
accuracy_sample = 3        # matrices checked against exact float64 SVDs (largest MLP and attention ones)
agree_rtol = 1e-3          # (b) agreement bar between pysafe and modeldelta
exact_norms = True         # float64 ‖ΔW‖/‖W_base‖ of every matrix as a reference (one more pass over the pair)
cold = True                # drop the pair from the page cache before each tool
read_probe_mb = 2048       # cap of each read-bandwidth probe
sgemm_n = 4096             # size of the sgemm probe
skip = ""                  # comma-separated tools to skip: torch, modeldelta, pysafe_default, cached
results = None             # also append the JSON lines to this file

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, val in (("preset", preset), ("layers", layers), ("base-spectrum", base_spectrum), ("alpha", alpha), ("delta-scale", delta_scale),
                      ("seed", seed), ("generator", generator), ("data-dir", data_dir), ("threads", threads),
                      ("rank", rank),
                      ("base-rank", base_rank), ("niter", niter), ("oversample", oversample),
                      ("md-top-k", md_top_k), ("tol", tol), ("matched-tol", matched_tol), ("base-tol", base_tol), ("repeat", repeat), ("accuracy-sample", accuracy_sample),
                      ("agree-rtol", agree_rtol), ("read-probe-mb", read_probe_mb), ("sgemm-n", sgemm_n),
                      ("skip", skip), ("results", results)):
        typ = type(val) if val is not None else (float if name == "tol" else int if name == "layers" else str)
        p.add_argument(f"--{name}", type=typ, default=val)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=cold)
    p.add_argument("--exact-norms", action=argparse.BooleanOptionalAction, default=exact_norms)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------
# The pair
# ------------------------------------------------------------------------------------------------

def pysafe_has_spectrum() -> bool:
    from pysafe.synthetic import PairSpec

    return "delta_spectrum" in {f.name for f in dataclasses.fields(PairSpec)}


def ensure_pair(args) -> tuple[Path, str]:
    """The pair and who wrote its ΔW: make_pair's own power-law option where this pysafe has it (and
    --generator allows), else W_base from make_pair and the tuned side rewritten here."""
    import pysafe

    gen_kind = args.generator
    if gen_kind == "auto":
        gen_kind = "pysafe" if pysafe_has_spectrum() else "bench"
    if gen_kind == "pysafe" and not pysafe_has_spectrum():
        sys.exit("--generator pysafe: this pysafe's make_pair has no delta_spectrum option")
    tag = (f"peers-{args.preset}" + (f"-L{args.layers}" if args.layers else "")
           + ("" if args.base_spectrum == "gaussian" else f"-b{args.base_spectrum.replace(':', '')}")
           + f"-a{args.alpha:g}-s{args.seed}-{gen_kind}")
    out = Path(args.data_dir) if args.data_dir else REPO / "bench" / "data" / tag
    want = {"alpha": args.alpha, "delta_scale": args.delta_scale, "seed": args.seed, "preset": args.preset,
            "layers": args.layers, "generator": gen_kind}
    if args.base_spectrum != "gaussian":
        if gen_kind != "pysafe":
            sys.exit("--base-spectrum: needs make_pair's base_spectrum option (--generator pysafe)")
        want["base_spectrum"] = args.base_spectrum
    if gen_kind == "pysafe":
        marker = out / "peers_delta.json"
        if not (marker.exists() and json.loads(marker.read_text()) == want):
            extra = {} if args.base_spectrum == "gaussian" else {"base_spectrum": args.base_spectrum}
            pysafe.make_pair(out, args.preset, layers=args.layers, seed=args.seed, delta_scale=args.delta_scale,
                             delta_spectrum=f"powerlaw:{args.alpha:g}", **extra)
            marker.write_text(json.dumps(want))
        return out, gen_kind
    return write_bench_pair(out, args, want), gen_kind


def write_bench_pair(out: Path, args, want: dict) -> Path:
    """W_base from make_pair; tuned rewritten with the power-law ΔW (shard layout of make_pair's tuned)."""
    import pysafe
    import torch
    from safetensors.torch import load_file, save_file

    marker = out / "tuned" / "peers_delta.json"
    if marker.exists() and json.loads(marker.read_text()) == want:
        return out
    t0 = time.perf_counter()
    if not (out / "base" / "model.safetensors.index.json").exists():
        pysafe.make_pair(out, args.preset, layers=args.layers)
    tuned = out / "tuned"
    index = json.loads((tuned / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    base_index = json.loads((out / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    vectors = {}  # (m, n) -> (U, V): one QR per shape; signed row/column permutations make matrices differ
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        tensors = {}
        base_cache = {}
        for name in names:
            bfile = out / "base" / base_index[name]
            if bfile not in base_cache:
                base_cache = {bfile: load_file(bfile)}
            wb = base_cache[bfile][name]
            if wb.ndim != 2:
                tensors[name] = wb.clone()
                continue
            m, n = wb.shape
            if (m, n) not in vectors:
                d = min(m, n)
                U, _ = torch.linalg.qr(torch.randn(m, d, generator=gen))
                V, _ = torch.linalg.qr(torch.randn(n, d, generator=gen))
                vectors[(m, n)] = (U, V)
            U, V = vectors[(m, n)]
            d = U.shape[1]
            s = torch.arange(1, d + 1, dtype=torch.float64) ** (-args.alpha)
            wbf = wb.float()
            s *= args.delta_scale * float(wbf.norm()) / float(s.norm())
            pr, pc = torch.randperm(m, generator=gen), torch.randperm(n, generator=gen)
            sr = torch.randint(0, 2, (m, 1), generator=gen).float() * 2 - 1
            sc = torch.randint(0, 2, (1, n), generator=gen).float() * 2 - 1
            dW = ((U[pr] * s.float()) @ V[pc].T) * sr * sc
            tensors[name] = (wbf + dW).to(wb.dtype)
            del dW, wbf
        tmp = tuned / (shard + ".partial")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, tuned / shard)
        del tensors
    marker.write_text(json.dumps(want))
    print(f"pair: power-law tuned side written in {time.perf_counter() - t0:.1f} s -> {out}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------
# Workers (each in its own subprocess)
# ------------------------------------------------------------------------------------------------

def _pysafe_options(cfg: dict, **kw) -> dict:
    """Options for pysafe.compare, adding tol only where this pysafe has it (the engine's --tol)."""
    from pysafe.weights import Options

    fields = {f.name for f in dataclasses.fields(Options)}
    opts = {"threads": cfg["threads"], **kw}
    if cfg.get("tol") is not None:
        if "tol" not in fields:
            raise SystemExit("--tol given but this pysafe has no tol option")
        opts["tol"] = cfg["tol"]
    if cfg.get("base_tol") is not None:
        if "base_tol" not in fields:
            raise SystemExit("pysafe_topk_basetol needs a pysafe with --base-tol (skip it: --skip pysafe_topk_basetol)")
        opts["base_tol"] = cfg["base_tol"]
    return {k: v for k, v in opts.items() if k in fields}


def _record_flops(r: dict, opts: dict) -> tuple[float, str]:
    """Flops of the SVDs and projections a pysafe record says were run (see README for the model)."""
    m, n = r["stored_shape"]
    d = min(m, n)
    total, notes = 0.0, []

    def side(method, l, k, suffix):
        nonlocal total
        big, small = max(m, n), min(m, n)
        counted = r.get(f"svd_flops{suffix or '_delta'}")
        if counted is not None and math.isfinite(float(counted)) and float(counted) > 0:
            total += float(counted)  # what the engine counted for the algorithm it ran (f64 work twice)
            notes.append("svd_flops")
            return
        if method in (None, "none", "factored", "cache"):
            return
        if method == "exact" or method.startswith("exact") or method.startswith("gesdd"):
            if "values" in method:
                total += 4 * big * small ** 2 - 4 * small ** 3 / 3
            else:
                total += 6 * big * small ** 2 + 20 * small ** 3
            return
        if method == "gram_eig":
            # Gram matrix (syrk, big·small² flops) and tridiagonal reduction (4/3·small³) in float64, counted
            # twice (f64 runs at about half the f32 rate), plus the top-k eigenvectors mapped back (2·m·n·k)
            total += 2 * (big * small ** 2 + 4 * small ** 3 / 3) + 2.0 * m * n * k
            notes.append("gram_eig model")
            return
        # sketch-based (randomized range finder, subspace iteration): width l (at least k + oversampling,
        # as records may keep only the k reported values) times the passes over A
        l = min(small, max(l, k + int(opts.get("oversample", 10) or 0)))
        passes = None
        for key in (f"svd_passes{suffix}", f"svd_matmuls{suffix}", f"svd_iterations{suffix}",
                    f"svd_power_iters{suffix}", f"svd_iters{suffix}"):
            if key in r and r[key] is not None and math.isfinite(float(r[key])) and float(r[key]) > 0:
                v = float(r[key])
                passes = v if "passes" in key or "matmuls" in key else 2 * v + 2
                notes.append(key.replace(suffix, "") if suffix else key)
                break
        if passes is None:
            q = opts.get("power_iters", 2)
            passes = 2 * (q if q is not None and q >= 0 else 2) + 2
            notes.append("passes from options")
        total += 2.0 * m * n * l * passes + 4.0 * max(m, n) * l * l * (passes / 2)

    sd, sb = r.get("sv_delta"), r.get("sv_base")
    kb = int(r.get("rank_base", 0) or 0)
    delta_suffix = "_delta" if any(k.endswith("_delta") and k.startswith("svd_iterations") for k in r) else ""
    side(r.get("svd_method"), len(sd) if sd is not None else 0, int(r.get("rank_delta", 0) or 0), delta_suffix)
    if not r.get("base_svd_cached"):
        side(r.get("svd_method_base"), len(sb) if sb is not None else 0, kb, "_base")
    total += 2.0 * m * n * min(kb, d) * 2  # ΔW's projections on W_base's column and row spaces
    if (r.get("svd_flops_delta") is None and r.get("svd_rel_error") is not None
            and math.isfinite(float(r.get("svd_rel_error") or float("nan")))):
        total += 2.0 * m * n * int(r.get("rank_delta", 0) or 0)  # the a-posteriori residual A·V_k
    return total, ",".join(sorted(set(notes)))


def worker_pysafe(cfg: dict) -> dict:
    import numpy as np

    import pysafe

    opts = _pysafe_options(cfg, **cfg["options"])
    pysafe._core.set_num_threads(cfg["threads"])
    pysafe.truncated_svd(np.random.default_rng(0).standard_normal((256, 512), dtype=np.float32), rank=16,
                         exact_max_dim=0)  # warm-up: core, OpenBLAS threads (no file page touched)
    cache = None
    if cfg.get("cached"):  # a second fine-tune against the same base: fill the cache first (not timed)
        from pysafe.svdcache import BaseCache

        cache = BaseCache(cfg["cache_dir"])
        pysafe.compare(cfg["base"], cfg["tuned"], cache=cache, **opts)
        if cfg.get("cold"):  # the timed run reads the pair cold again, as the others do
            ba.drop_cache(cfg["files"])
    t0 = time.perf_counter()
    cmp = pysafe.compare(cfg["base"], cfg["tuned"], cache=cache, **opts)
    seconds = time.perf_counter() - t0
    flops, notes, per = 0.0, set(), {}
    methods = {}
    for r in cmp.records:
        if len(r["stored_shape"]) != 2:
            continue
        f, note = _record_flops(r, cmp.params)
        flops += f
        if note:
            notes.add(note)
        key = f"{r.get('svd_method')}/{r.get('svd_method_base')}"
        methods[key] = methods.get(key, 0) + 1
        per[r["name"]] = {"delta_rel": r["delta_rel"], "sv_delta": [float(x) for x in r["sv_delta"][: r["rank_delta"]]],
                          "sv_base": [float(x) for x in r["sv_base"][: r["rank_base"]]],
                          "energy_topk_delta": r["energy_topk_delta"], "rank_delta": r["rank_delta"],
                          "effective_rank_delta": r["effective_rank_delta"],
                          "effective_rank_delta_err": r.get("effective_rank_delta_err")}
    return {"seconds": seconds, "bytes_read": int(cmp.bytes_read), "flops": flops, "flop_notes": sorted(notes),
            "cache": cmp.cache,
            "methods": methods, "params": {k: v for k, v in cmp.params.items() if k not in ("include", "exclude")},
            "per_matrix": per}


def worker_torch(cfg: dict) -> dict:
    """What a user writes today (the issue's baseline): safetensors + torch.svd_lowrank(niter=4)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    k, kb, p, q = cfg["rank"], cfg["base_rank"], cfg["oversample"], cfg["niter"]
    torch.svd_lowrank(torch.randn(256, 512), q=16 + p, niter=q)  # warm-up
    t0 = time.perf_counter()
    per, nbytes, flops = {}, 0, 0.0
    for name, wb, wt in ba.pair_tensors(cfg["base"], cfg["tuned"]):
        nbytes += wb.numel() * wb.element_size() + wt.numel() * wt.element_size()
        if wb.ndim != 2:
            continue
        Wb = wb.float()
        dW = wt.float() - Wb
        del wb, wt
        m, n = dW.shape
        d = min(m, n)
        qd, qb = min(k + p, d), min(kb + p, d)
        _, Sd, _ = torch.svd_lowrank(dW, q=qd, niter=q)
        _, Sb, _ = torch.svd_lowrank(Wb, q=qb, niter=q)
        flops += 2.0 * m * n * (qd + qb) * (2 * q + 2)
        per[name] = {"sv_delta": Sd[:k].tolist(), "sv_base": Sb[:kb].tolist(),
                     "delta_rel": float(dW.norm() / Wb.norm())}
        del Wb, dW
    return {"seconds": time.perf_counter() - t0, "bytes_read": nbytes, "flops": flops, "per_matrix": per}


def worker_modeldelta(cfg: dict) -> dict:
    """`modeldelta A B`'s analysis: compare_models over the two local checkpoints (no report rendering)."""
    import torch
    from modeldelta.core.weight_diff import compare_models
    from modeldelta.utils.model_loader import get_tensor_map

    torch.set_num_threads(cfg["threads"])
    torch.linalg.svdvals(torch.randn(64, 64))  # warm-up
    t0 = time.perf_counter()
    res, skipped = compare_models(get_tensor_map(cfg["base"]), get_tensor_map(cfg["tuned"]), top_k=cfg["md_top_k"])
    seconds = time.perf_counter() - t0
    per = {r["name"]: {k: r.get(k) for k in ("frob_norm_relative", "top_singular_values", "effective_rank",
                                             "concentration_top_k", "n_singular_values")}
           for r in res if r.get("has_svd")}
    import modeldelta

    return {"seconds": seconds, "n_results": len(res), "skipped": skipped, "per_matrix": per,
            "version": getattr(modeldelta, "__version__", None)}


WORKERS = {"machine": ba.worker_machine, "pysafe": worker_pysafe, "torch": worker_torch,
           "modeldelta": worker_modeldelta}


def run_worker(kind: str, cfg: dict, files: list[str], cold_: bool) -> dict:
    resident = None
    if cold_ and kind != "machine":
        ba.drop_cache(files)
        resident = ba.resident_fraction(files)
    load = ba.busy_warning(kind)
    out = ba.run_worker(kind, cfg, script=__file__, cwd_tmp=True)
    out["cache_resident_at_start"] = resident
    out["loadavg_1m_at_start"] = load
    return out


def worker_main(kind: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    out = WORKERS[kind](cfg)
    out["vm_hwm_mb"] = ba.vm_status("VmHWM")
    Path(cfg["out"]).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# References and comparisons
# ------------------------------------------------------------------------------------------------

def _pair_f64(base: dict, tuned: dict, name: str):
    """W_base and W_tuned of one tensor as float64 torch tensors, read with the safetensors library."""
    from safetensors import safe_open

    sides = []
    for side in (base, tuned):
        with safe_open(side[name]["file"], framework="pt") as f:
            sides.append(f.get_tensor(name).double())
    return sides


def float64_norms(base: dict, tuned: dict, names) -> dict:
    """‖ΔW‖_F / ‖W_base‖_F in float64 for every matrix (one pass, no SVD)."""
    out = {}
    for name in names:
        wb, wt = _pair_f64(base, tuned, name)
        out[name] = float((wt - wb).norm() / wb.norm())
    return out


def exact_reference(base: dict, tuned: dict, names: list[str]) -> dict:
    """Float64 full spectra of ΔW and W_base (ΔW formed from the stored bf16 values, as every tool does)."""
    import torch

    out = {}
    for name in names:
        wb, wt = _pair_f64(base, tuned, name)
        sd = torch.linalg.svdvals(wt - wb)
        sb = torch.linalg.svdvals(wb)
        p2 = sd ** 2 / (sd ** 2).sum()
        p1 = sd / sd.sum()
        h2 = -(p2[p2 > 0] * p2[p2 > 0].log()).sum()
        h1 = -(p1[p1 > 1e-12] * p1[p1 > 1e-12].log()).sum()
        out[name] = {"sv_delta": sd.tolist(), "sv_base": sb[:512].tolist(),
                     "erank_sq": float(h2.exp()), "erank_sigma": float(h1.exp()),
                     "delta_rel": float((wt - wb).norm() / wb.norm())}
    return out


def max_rel(got, ref) -> float | None:
    if not got:
        return None
    k = min(len(got), len(ref))
    return max(abs(got[i] - ref[i]) / ref[i] for i in range(k) if ref[i] > 0)


def rel(a, b) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return abs(a - b) / abs(b)


def _sig(x):
    """Three significant digits (errors span 1e-16 .. 1: fixed decimals would print zeros)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.3g}")


def _mx(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args._worker:
        worker_main(args._worker, args._config)
        return
    skipped_tools = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "modeldelta" not in skipped_tools:
        try:
            import modeldelta  # noqa: F401
        except ImportError:
            sys.exit("modeldelta is not installed: pip install modeldelta==0.4.4 (or --skip modeldelta)")
    if args.tol is not None:
        from pysafe.weights import Options

        if "tol" not in {f.name for f in dataclasses.fields(Options)}:
            sys.exit("--tol: this pysafe build has no tol option (it comes with the engine's stopping rule)")
    pair, gen_kind = ensure_pair(args)
    base, tuned = ba.side_tensors(pair / "base"), ba.side_tensors(pair / "tuned")
    mats = {n: tuple(base[n]["shape"]) for n in base if n in tuned and len(base[n]["shape"]) == 2}
    nbytes = sum(base[n]["nbytes"] + tuned[n]["nbytes"] for n in base if n in tuned)
    files = ba.shard_files(pair)
    sample = ba.pick_sample(mats, args.accuracy_sample) if args.accuracy_sample > 0 else []
    nthreads = ba.resolve_threads(args.threads)
    env = {**ba.git_info(), "cpu": ba.cpu_model(), "ncpu": os.cpu_count()}
    common = {"bench": "peers", "preset": args.preset, "layers": args.layers, "base_spectrum": args.base_spectrum,
              "alpha": args.alpha, "repeat": args.repeat,
              "generator": gen_kind,
              "delta_scale": args.delta_scale, "threads": nthreads, "n_matrices": len(mats),
              "shapes": ba.shapes_summary(mats), "pair_bytes": nbytes}
    cfg = {"base": str(pair / "base"), "tuned": str(pair / "tuned"), "files": files, "threads": nthreads,
           "rank": args.rank, "base_rank": args.base_rank, "oversample": args.oversample, "niter": args.niter,
           "md_top_k": args.md_top_k, "tol": args.tol, "read_probe_mb": args.read_probe_mb, "sgemm_n": args.sgemm_n}
    lines = []

    def emit(rec):
        rec = {**common, **rec, **env}
        lines.append(rec)
        ba.emit(rec, args.results)

    machine = run_worker("machine", cfg, files, False)
    read_bw = machine["read_cold_gbps"] * 1e9
    sgemm = machine["sgemm_gflops"] * 1e9
    emit({"tool": "machine", **{k: ba._r(v) if isinstance(v, float) else v for k, v in machine.items()
                               if k not in ("vm_hwm_mb", "process_seconds", "peak_rss_mb")}})

    def floor(flops):
        return max(nbytes / read_bw, flops / sgemm)

    runs = {}
    cache_dir = tempfile.mkdtemp(prefix="pysafe-peers-cache-")
    topk = {"rank": args.rank, "base_rank": args.base_rank, "spectrum": "none"}  # what torch's script computes
    todo = [("pysafe_fixed", "pysafe", {"options": {"rank": args.rank, "base_rank": args.base_rank}}),
            ("pysafe_topk", "pysafe", {"options": topk}),
            ("pysafe_topk_matched", "pysafe", {"options": topk, "tol": args.matched_tol}),
            ("pysafe_topk_basetol", "pysafe", {"options": topk, "base_tol": args.base_tol}),
            ("pysafe_fixed_cached", "pysafe", {"options": {"rank": args.rank, "base_rank": args.base_rank},
                                               "cached": True, "cache_dir": cache_dir, "cold": args.cold}),
            ("torch_lowrank", "torch", {}),
            ("pysafe_md", "pysafe", {"options": {"rank": args.md_top_k, "base_rank": 1}}),
            ("modeldelta", "modeldelta", {}),
            ("pysafe_default", "pysafe", {"options": {}})]
    skip_map = {"torch": "torch_lowrank", "modeldelta": "modeldelta", "pysafe_default": "pysafe_default",
                "cached": "pysafe_fixed_cached"}
    todo = [t for t in todo if t[0] not in {skip_map.get(s, s) for s in skipped_tools}]
    try:
        for _ in range(max(1, args.repeat)):  # interleaved: every tool sees the same load on average
            for label, kind, extra in todo:
                r = run_worker(kind, {**cfg, **extra}, files, args.cold)
                times = runs[label]["all_seconds"] if label in runs else []
                if label not in runs or r["seconds"] < runs[label]["seconds"]:
                    runs[label] = r
                runs[label]["all_seconds"] = times + [round(r["seconds"], 3)]
    finally:
        import shutil

        shutil.rmtree(cache_dir, ignore_errors=True)

    ref = exact_reference(base, tuned, sample) if sample else {}
    ref_norms = float64_norms(base, tuned, mats) if args.exact_norms else {}

    for label, r in runs.items():
        per = r["per_matrix"]
        rec = {"tool": label, "seconds": ba._r(r["seconds"], 3), "process_seconds": ba._r(r["process_seconds"], 3),
               "peak_rss_mb": ba._r(r["peak_rss_mb"], 1), "bytes_read": r.get("bytes_read"),
               "cache_resident_at_start": ba._r(r["cache_resident_at_start"]),
               "loadavg_1m_at_start": ba._r(r["loadavg_1m_at_start"], 2), "all_seconds": r.get("all_seconds")}
        if "flops" in r:
            fl = floor(r["flops"])
            rec.update({"flops": r["flops"], "floor_seconds": ba._r(fl, 3), "x_floor": ba._r(r["seconds"] / fl, 2),
                        "floor_term": "read" if nbytes / read_bw >= r["flops"] / sgemm else "sgemm"})
        if label.startswith("pysafe"):
            rec.update({"svd_methods": r["methods"], "flop_notes": r["flop_notes"], "cache": r.get("cache"),
                        "options": {k: r["params"].get(k) for k in ("rank", "base_rank", "energy", "base_energy",
                                                                     "power_iters", "oversample", "max_rank", "tol", "base_tol",
                                                                     "exact_max_dim") if k in r["params"]}})
        if ref_norms:
            key = "frob_norm_relative" if label == "modeldelta" else "delta_rel"
            rec["relative_norm_rel_err"] = _sig(_mx(rel(per.get(n, {}).get(key), x) for n, x in ref_norms.items()))
        if label in ("pysafe_fixed", "pysafe_fixed_cached", "pysafe_topk", "pysafe_topk_matched", "pysafe_topk_basetol",
                     "torch_lowrank"):
            rec["sv_rel_err_delta"] = _sig(_mx(max_rel(per.get(n, {}).get("sv_delta"), ref[n]["sv_delta"])
                                               for n in ref))
            rec["sv_rel_err_base"] = _sig(_mx(max_rel(per.get(n, {}).get("sv_base"), ref[n]["sv_base"])
                                              for n in ref))
        if label in ("pysafe_md", "pysafe_default"):
            rec["erank_sq_rel_err"] = _sig(_mx(rel(per.get(n, {}).get("effective_rank_delta"), ref[n]["erank_sq"])
                                               for n in ref))
            rec["erank_sq_err_bar"] = _sig(_mx(per.get(n, {}).get("effective_rank_delta_err") for n in ref))
            bars = [(per.get(n, {}).get("effective_rank_delta"), per.get(n, {}).get("effective_rank_delta_err"),
                     ref[n]["erank_sq"]) for n in ref]
            if bars and all(e is not None for _, e, _ in bars):  # an estimate: is the exact value inside its bar?
                rec["erank_sq_within_err_bar"] = all(abs(v - x) <= e for v, e, x in bars)
        if label == "modeldelta":
            rec["version"] = r["version"]
            rec["erank_sigma_rel_err"] = _sig(_mx(rel(per.get(n, {}).get("effective_rank"), ref[n]["erank_sigma"])
                                                  for n in ref))
            rec["top_sv_rel_err"] = _sig(_mx(max_rel(per.get(n, {}).get("top_singular_values"), ref[n]["sv_delta"])
                                             for n in ref))
        emit(rec)

    summary = {"tool": "summary"}
    if "pysafe_fixed" in runs and "torch_lowrank" in runs:
        a, b = runs["pysafe_fixed"], runs["torch_lowrank"]
        ea = _mx(max_rel(a["per_matrix"].get(n, {}).get("sv_delta"), ref[n]["sv_delta"]) for n in ref)
        eb = _mx(max_rel(b["per_matrix"].get(n, {}).get("sv_delta"), ref[n]["sv_delta"]) for n in ref)
        summary["a_speedup_vs_torch"] = ba._r(b["seconds"] / a["seconds"], 3)
        summary["a_rss_ratio_torch_over_pysafe"] = ba._r(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
        summary["a_accuracy_equal_or_better"] = None if ea is None or eb is None else bool(ea <= eb * 1.1 + 1e-7)

    def side_err(run, key):
        return _mx(max_rel(run["per_matrix"].get(n, {}).get(key), ref[n][key]) for n in ref)

    for label in ("pysafe_topk", "pysafe_topk_matched", "pysafe_topk_basetol"):  # what torch's script computes
        if label in runs and "torch_lowrank" in runs:
            a, b = runs[label], runs["torch_lowrank"]
            short = label.replace("pysafe_", "")
            summary[f"a_{short}_speedup_vs_torch"] = ba._r(b["seconds"] / a["seconds"], 3)
            summary[f"a_{short}_rss_ratio_torch_over_pysafe"] = ba._r(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
            better = []
            for key in ("sv_delta", "sv_base"):
                ea, eb = side_err(a, key), side_err(b, key)
                summary[f"a_{short}_err_{key}"] = _sig(ea)
                better.append(None if ea is None or eb is None else bool(ea <= eb * 1.1 + 1e-7))
            summary[f"a_{short}_accuracy_equal_or_better"] = None if None in better else all(better)
    if "pysafe_md" in runs and "modeldelta" in runs:
        a, m = runs["pysafe_md"], runs["modeldelta"]
        k = args.md_top_k
        worst = {"relative_norm": [], "top_sv": [], "concentration": []}
        for name, mr in m["per_matrix"].items():
            pr = a["per_matrix"].get(name)
            if pr is None:
                continue
            worst["relative_norm"].append(rel(pr["delta_rel"], mr["frob_norm_relative"]))
            kk = min(k, len(mr["top_singular_values"]), len(pr["sv_delta"]))
            worst["top_sv"].append(max_rel(pr["sv_delta"][:kk], mr["top_singular_values"][:kk]))
            if pr["rank_delta"] == mr.get("n_singular_values") or pr["rank_delta"] == k:
                worst["concentration"].append(rel(pr["energy_topk_delta"], mr["concentration_top_k"]))
        agree = {f"b_max_rel_diff_{key}": _sig(_mx(v)) for key, v in worst.items()}
        summary.update(agree)
        summary["b_matrices_compared"] = len(worst["top_sv"])
        summary["b_agree_within_rtol"] = all(v is not None and v <= args.agree_rtol for v in agree.values())
        summary["b_speedup_vs_modeldelta"] = ba._r(m["seconds"] / a["seconds"], 3)
        summary["b_rss_ratio_modeldelta_over_pysafe"] = ba._r(m["peak_rss_mb"] / a["peak_rss_mb"], 3)
        if "pysafe_default" in runs:
            summary["b_default_speedup_vs_modeldelta"] = ba._r(m["seconds"] / runs["pysafe_default"]["seconds"], 3)
    if "pysafe_fixed" in runs and "pysafe_fixed_cached" in runs:
        fixed, cached = runs["pysafe_fixed"]["seconds"], runs["pysafe_fixed_cached"]["seconds"]
        summary["cache_speedup_fixed"] = ba._r(fixed / cached, 3)
        # the per-matrix numbers kept here (spectra, norms, ranks) must be identical with and without the cache
        summary["cache_records_identical"] = (json.dumps(runs["pysafe_fixed"]["per_matrix"], sort_keys=True)
                                              == json.dumps(runs["pysafe_fixed_cached"]["per_matrix"], sort_keys=True))
        summary["cache_hits"] = (runs["pysafe_fixed_cached"].get("cache") or {}).get("hits")
    for label in ("pysafe_fixed", "pysafe_fixed_cached", "pysafe_topk", "pysafe_topk_matched", "pysafe_topk_basetol",
                  "pysafe_md", "pysafe_default"):
        if label in runs and "flops" in runs[label]:
            summary[f"c_{label}_x_floor"] = ba._r(runs[label]["seconds"] / floor(runs[label]["flops"]), 2)
    summary["agree_rtol"] = args.agree_rtol
    summary["accuracy_sample"] = sample
    emit(summary)
    print(markdown(lines), flush=True)


def markdown(lines: list[dict]) -> str:
    """The results as one markdown table (tools) plus the summary's ratios."""
    rows = ["| tool | seconds | peak RSS MB | floor s (term) | × floor | top-k σ rel. err ΔW / W_base "
            "| eff. rank rel. err | ‖ΔW‖/‖W‖ rel. err |", "|---|---|---|---|---|---|---|---|"]
    summ = {}
    for r in lines:
        if r["tool"] == "machine":
            mach = r
            continue
        if r["tool"] == "summary":
            summ = r
            continue
        err = r.get("sv_rel_err_delta"), r.get("sv_rel_err_base")
        er = r.get("erank_sq_rel_err", r.get("erank_sigma_rel_err"))
        if r["tool"] == "modeldelta" and r.get("top_sv_rel_err") is not None:
            err = (r["top_sv_rel_err"], None)
        rows.append(f"| {r['tool']} | {r['seconds']} | {r['peak_rss_mb']} | "
                    f"{r.get('floor_seconds', '')} ({r.get('floor_term', '')}) | {r.get('x_floor', '')} | "
                    f"{_fmt(err[0])} / {_fmt(err[1])} | {_fmt(er)} | {_fmt(r.get('relative_norm_rel_err'))} |")
    head = (f"\npreset {lines[0]['preset']}, alpha {lines[0]['alpha']}, {lines[0]['n_matrices']} matrices, "
            f"{lines[0]['pair_bytes'] / 1e9:.2f} GB, {lines[0]['threads']} threads; read cold "
            f"{mach.get('read_cold_gbps')} GB/s, warm {mach.get('read_warm_gbps')} GB/s, sgemm "
            f"{mach.get('sgemm_gflops')} GFLOP/s\n")
    ratios = "\n".join(f"- {k}: {v}" for k, v in summ.items()
                       if k.startswith(("a_", "b_", "c_", "cache_")))
    return head + "\n" + "\n".join(rows) + "\n\n" + ratios


def _fmt(x):
    return "" if x is None else f"{x:.2e}"


if __name__ == "__main__":
    main()

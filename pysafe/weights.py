"""compare(): pair two checkpoints by tensor name, pre-flight, and compute per-matrix metrics.

The heavy work (fused upcast-subtract, SVDs, subspace metrics) runs in the native core, one
tensor at a time, so memory stays bounded by a few tensors whatever the model size.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from pysafe._loader import _core
from pysafe.backend import device_name, engine_device, parse_device
from pysafe.checkpoint import UNSUPPORTED_DTYPES, Checkpoint, PeftAdapter, detect_scheme, name_info
from pysafe.errors import CheckpointError, ShapeMismatchError
from pysafe.linalg import svd_options
from pysafe.records import scalars


def _opt(default, help: str, **cli):
    """A field of :class:`Options` with its command-line description in the metadata: ``help``, and
    optionally ``range`` ((lo, hi, lo_open, hi_open); None for no bound), ``choices``, ``metavar``, ``flag``
    (the option's name when not ``--field-name``). ``pysafe analyze`` builds its flags from these."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class Options:
    """Every option of an analysis (the CLI flags of ``pysafe analyze``, generated from the metadata
    here), recorded in summary.json."""

    include: str | None = _opt(None, "Analyse only tensors whose name matches.", metavar="REGEX")
    exclude: str | None = _opt(None, "Skip tensors whose name matches.", metavar="REGEX")
    rank: int | None = _opt(None, "Fixed rank k for ΔW (else --energy).", range=(1, None, False, False))
    energy: float = _opt(0.9, "k = smallest with Σσ² ≥ E·‖ΔW‖²_F.", range=(0, 1, True, False))
    base_rank: int | None = _opt(None, "Fixed rank k for W_base.", range=(1, None, False, False))
    base_energy: float = _opt(0.9, "Energy fraction for W_base's k.", range=(0, 1, True, False))
    exact: bool = _opt(False, "Force exact (LAPACK) SVDs.")
    max_rank: int | None = _opt(None, "Explicit cap on k under the energy rule (default: none, the energy is "
                                      "reached; a capped record says energy_reached false).",
                                range=(1, None, False, False))
    exact_max_dim: int = _opt(1024, "Exact SVD when min(out, in) is at most this.", range=(0, None, False, False))
    oversample: int = _opt(10, "Oversampling p of the randomized SVD.", range=(0, None, False, False))
    power_iters: int | None = _opt(None, "Subspace iterations of the randomized SVD: q gives exactly q + 1 "
                                         "(default: iterate until --tol is met).", range=(0, None, False, False))
    tol: float = _opt(1e-4, "Relative error allowed on the reported top singular values; each matrix gets the "
                            "cheapest algorithm that meets it (records: svd_method_*, svd_rel_error_*, "
                            "tol_reached_*).", range=(0, 1, True, True))
    base_tol: float | None = _opt(None, "Relative error allowed on W_base's reported top singular values "
                                        "(default: --tol). A flat base spectrum is where the iterations go: a "
                                        "looser bound there keeps ΔW's at --tol (record: tol_base).",
                                  range=(0, 1, True, True))
    spectrum: str = _opt("full", "full: ΔW's whole spectrum (effective_rank_delta, energy_rank_*_delta); none: "
                                 "skip it (faster with --rank; those keys are null).", choices=("full", "none"))
    center: bool = _opt(False, "Subtract the mean row before the SVDs (the paper's variant).")
    dtype: str = _opt("f32", "Precision of ΔW and the linear algebra.", choices=("f32", "f64"))
    threads: int = _opt(0, "Worker threads for the core and BLAS (0: all cores).", range=(0, None, False, False))
    seed: int = _opt(0, "Seed of the randomized SVD (results are deterministic per seed and thread count).",
                     range=(0, None, False, False))
    save_vectors: bool = _opt(False, "Store the top-k singular vectors in results.h5.")
    strict: bool = _opt(False, "Mismatched names, shapes or dtypes are errors instead of skips.")
    device: str = _opt("cpu", "Where the SVDs run: cpu, cuda or cuda:N.")

    def validate(self) -> None:
        if self.dtype not in ("f32", "f64"):
            raise ValueError(f"dtype must be 'f32' or 'f64', got {self.dtype!r}")
        for name in ("energy", "base_energy"):
            v = getattr(self, name)
            if not (0.0 < v <= 1.0) or math.isnan(v):
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        for name in ("rank", "base_rank"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if not (0.0 < self.tol < 1.0) or math.isnan(self.tol):
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.base_tol is not None and (not (0.0 < self.base_tol < 1.0) or math.isnan(self.base_tol)):
            raise ValueError(f"base_tol must be in (0, 1), got {self.base_tol}")
        parse_device(self.device)
        if self.spectrum not in ("full", "none"):
            raise ValueError(f"spectrum must be 'full' or 'none', got {self.spectrum!r}")
        for name, lo in (("max_rank", 1), ("exact_max_dim", 0), ("oversample", 0), ("power_iters", 0),
                         ("threads", 0), ("seed", 0)):
            if getattr(self, name) is not None and getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regular expression: {pattern!r} ({exc})") from None


@dataclass
class Preflight:
    """What pairing found before any data was read."""

    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    shape_mismatch: list[dict] = field(default_factory=list)
    dtype_differs: list[dict] = field(default_factory=list)
    not_matrix: list[dict] = field(default_factory=list)
    filtered_out: int = 0
    pairs: list[str] = field(default_factory=list)  # analysed names, in read order

    def __repr__(self) -> str:
        return (f"Preflight({len(self.pairs)} pairs, {len(self.only_in_base)} only in base, "
                f"{len(self.only_in_tuned)} only in tuned, {len(self.shape_mismatch)} shape mismatches)")

    def lines(self) -> list[str]:
        out = []
        if self.only_in_base:
            out.append(f"{len(self.only_in_base)} tensors only in base (e.g. {self.only_in_base[0]})")
        if self.only_in_tuned:
            out.append(f"{len(self.only_in_tuned)} tensors only in tuned (e.g. {self.only_in_tuned[0]})")
        for m in self.shape_mismatch:
            out.append(f"shape mismatch: {m['name']} base {m['base']} vs tuned {m['tuned']}")
        if self.dtype_differs:
            m = self.dtype_differs[0]
            out.append(f"{len(self.dtype_differs)} tensors differ in dtype (e.g. {m['name']}: base {m['base']}, "
                       f"tuned {m['tuned']}); both are upcast before subtracting")
        return out


@dataclass
class Comparison:
    """Result of :func:`compare`: one record per analysed tensor plus what was skipped."""

    base: dict
    tuned: dict
    params: dict
    records: list[dict]
    skipped: list[dict]
    preflight: Preflight
    scheme: str
    seconds: float = 0.0
    bytes_read: int = 0
    cache: dict | None = None  # base-decomposition cache use: dir, hits, misses, writes (None: no cache)
    device: dict | None = None  # GPU runs: {"name": "cuda:N", "peak_bytes": most device memory held at once}

    def __repr__(self) -> str:
        def where(d):
            return (d or {}).get("path", "?") if isinstance(d, dict) else str(d)

        return (f"Comparison(base={where(self.base)!r}, tuned={where(self.tuned)!r}, {len(self.records)} tensors "
                f"analysed, {len(self.skipped)} skipped, scheme={self.scheme!r}, {self.seconds:.1f} s)")

    def to_pandas(self):
        """The records as a pandas DataFrame, one row per tensor (spectra and vectors left out).

        Needs pandas: ``pip install "pysafe[pandas]"``."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError('Comparison.to_pandas() needs pandas, which is not installed: '
                              'pip install "pysafe[pandas]" (or pip install pandas)') from None

        rows = [{k: v for k, v in scalars(r).items() if not isinstance(v, list)} for r in self.records]
        return pd.DataFrame(rows)

    def record(self, name: str) -> dict:
        """The record of tensor ``name``; KeyError (listing the nearest names) if it was not analysed."""
        for r in self.records:
            if r["name"] == name:
                return r
        import difflib

        names = [r["name"] for r in self.records]
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        skipped = next((s for s in self.skipped if s.get("name") == name), None)
        why = f" (skipped: {skipped.get('reason')})" if skipped else ""
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else (
            f"; analysed names look like {names[0]!r}" if names else "")
        raise KeyError(f"no record for tensor {name!r}{why}{hint}")


ProgressFn = Callable[[int, int, int, int, str], None]


def compare(base, tuned, *, progress: ProgressFn | None = None,
            on_preflight: Callable[[Preflight], None] | None = None, cache=None, **options) -> Comparison:
    """Compare two checkpoints tensor by tensor (docs/metrics.md).

    Args:
        base: path (or opened :class:`Checkpoint`) of the base model.
        tuned: path (or opened checkpoint / :class:`PeftAdapter`) of the fine-tuned model.
        progress: called as ``progress(done, total, bytes_done, bytes_total, name)`` after each tensor.
        on_preflight: called with the :class:`Preflight` as soon as pairing is done, before any data
            is read (the CLI prints mismatches there, in the first second).
        cache: reuse W_base's decompositions across runs (:mod:`pysafe.svdcache`): None/False (default) for
            none, True for the user's cache directory (``$XDG_CACHE_HOME/pysafe``), a directory path, or a
            :class:`pysafe.svdcache.BaseCache`. Records are identical with and without it, apart from the
            ``time_*`` keys and ``base_svd_cached``.
        **options: any field of :class:`Options` (``rank``, ``energy``, ``exact``, ``center``, ...).

    Returns:
        A :class:`Comparison` whose ``records`` carry the JSON keys of docs/metrics.md.

    Raises:
        FileNotFoundError, CheckpointError, HeaderError, ShardIndexError: unreadable inputs.
        ShapeMismatchError: the checkpoints share no tensor, or (``strict``) any mismatch.
        ValueError: a bad option value.
    """
    opts = Options(**options)
    opts.validate()
    index = engine_device(opts.device)  # a GPU that is not there fails here, before any file is opened
    if index >= 0:
        _core.backend.reset_peak(index)
    from pysafe.svdcache import open_cache

    bc = open_cache(cache)
    cache_before = bc.summary() if bc is not None else None
    t0 = time.perf_counter()
    b = base if isinstance(base, (Checkpoint, PeftAdapter)) else Checkpoint.open(base)
    t = tuned if isinstance(tuned, (Checkpoint, PeftAdapter)) else Checkpoint.open(tuned)
    if isinstance(b, PeftAdapter):
        raise CheckpointError(f"{b.path}: BASE is a PEFT adapter; pass the base model as BASE and the adapter as TUNED")
    threads_before = _core.get_num_threads()
    _core.set_num_threads(opts.threads)
    scheme = detect_scheme(b.tensors)
    try:
        if isinstance(t, PeftAdapter):
            records, skipped, pre, nbytes = _compare_adapter(b, t, opts, scheme, progress, on_preflight, bc)
        else:
            records, skipped, pre, nbytes = _compare_dense(b, t, opts, scheme, progress, on_preflight, bc)
        if bc is not None:
            bc.prune()
    finally:
        _core.set_num_threads(threads_before)  # do not leak our setting into the caller's process
        if not isinstance(base, (Checkpoint, PeftAdapter)):
            b.close()
        if not isinstance(tuned, (Checkpoint, PeftAdapter)):
            t.close()
    return Comparison(base=b.describe(), tuned=t.describe(), params=asdict(opts), records=records, skipped=skipped,
                      preflight=pre, scheme=scheme, seconds=time.perf_counter() - t0, bytes_read=nbytes,
                      cache=bc.summary(since=cache_before) if bc is not None else None,
                      device={"name": device_name(index), "peak_bytes": _core.backend.peak_bytes(index)}
                      if index >= 0 else None)


def preflight(b: Checkpoint, t: Checkpoint, opts: Options) -> Preflight:
    """Pair tensors by name (never by shard) and list every mismatch, reading headers only."""
    pre = Preflight()
    inc = re.compile(opts.include) if opts.include else None
    exc = re.compile(opts.exclude) if opts.exclude else None
    pre.only_in_base = sorted(set(b.tensors) - set(t.tensors))
    pre.only_in_tuned = sorted(set(t.tensors) - set(b.tensors))
    common = set(b.tensors) & set(t.tensors)
    if not common:
        raise ShapeMismatchError(
            f"{b.path} and {t.path} share no tensor names (base has e.g. '{next(iter(sorted(b.tensors)), '')}', "
            f"tuned has e.g. '{next(iter(sorted(t.tensors)), '')}'); are these checkpoints of the same model?")
    selected = []
    for name in common:
        if (inc and not inc.search(name)) or (exc and exc.search(name)):
            pre.filtered_out += 1
            continue
        bi, ti = b.tensors[name], t.tensors[name]
        if bi.shape != ti.shape:
            pre.shape_mismatch.append({"name": name, "base": list(bi.shape), "tuned": list(ti.shape)})
            continue
        if bi.dtype != ti.dtype:
            pre.dtype_differs.append({"name": name, "base": bi.dtype, "tuned": ti.dtype})
        if not (bi.is_float and ti.is_float):
            special = UNSUPPORTED_DTYPES.get(bi.dtype) or UNSUPPORTED_DTYPES.get(ti.dtype)
            reason = (f"{special} (base {bi.dtype}, tuned {ti.dtype})" if special
                      else f"non-float dtype (base {bi.dtype}, tuned {ti.dtype})")
            pre.not_matrix.append({"name": name, "reason": reason})
            continue
        if len(bi.shape) > 2:
            pre.not_matrix.append({"name": name, "reason": f"{len(bi.shape)}-D tensor {list(bi.shape)}: "
                                                           "no flattening rule"})
            continue
        selected.append(name)
    if not selected and not pre.shape_mismatch:
        what = f" matching --include {opts.include!r}" if inc else ""
        what += f" after --exclude {opts.exclude!r}" if exc else ""
        raise ShapeMismatchError(f"no tensor to analyse{what}: {len(common)} shared names, none selected")
    # Read in the base checkpoint's file order, so each shard is streamed front to back.
    pre.pairs = sorted(selected, key=lambda n: (b.tensors[n].file, b.tensors[n].offset))
    if opts.strict:
        problems = pre.lines()
        if pre.not_matrix:
            problems.append(f"{pre.not_matrix[0]['name']}: {pre.not_matrix[0]['reason']}")
        if problems:
            raise ShapeMismatchError("--strict: " + "; ".join(problems))
    return pre


def _svd_options(rank, energy, opts: Options, seed: int, full_spectrum: bool = False, tol: float | None = None):
    return svd_options(rank=rank, energy=energy, exact=opts.exact, max_rank=opts.max_rank,
                       exact_max_dim=opts.exact_max_dim, oversample=opts.oversample, power_iters=opts.power_iters,
                       tol=opts.tol if tol is None else tol, full_spectrum=full_spectrum, seed=seed,
                       device=parse_device(opts.device))


def _params(opts: Options, name: str, transposed: bool):
    # Seeds depend on (seed, tensor name) only: results do not depend on the order of tensors.
    h = zlib.crc32(name.encode())
    p = _core.AnalyzeParams()
    p.delta = _svd_options(opts.rank, opts.energy, opts, (opts.seed << 32) ^ (2 * h), opts.spectrum == "full")
    p.base = _svd_options(opts.base_rank, opts.base_energy, opts, (opts.seed << 32) ^ (2 * h + 1), tol=opts.base_tol)
    p.center = opts.center
    p.transpose = transposed
    p.save_vectors = opts.save_vectors
    return p


def _record(name: str, shape, bi, ti, scheme: str, raw: dict) -> dict:
    ni = name_info(name, scheme)
    rec = {"name": name, "layer": ni.layer, "module": ni.module,
           "shape": [int(shape[1]), int(shape[0])] if ni.transposed else [int(s) for s in shape],
           "stored_shape": [int(s) for s in shape], "transposed": ni.transposed,
           "dtype_base": bi.dtype, "dtype_tuned": ti.dtype if ti is not None else None}
    for k, v in raw.items():
        if k in ("energy_reached_delta", "energy_reached_base", "tol_reached_delta", "tol_reached_base"):
            rec[k] = bool(v)
        elif k in ("rank_delta", "rank_base", "nonfinite", "svd_sketch_passes", "out_features", "in_features",
                   "svd_iterations_delta", "svd_iterations_base"):
            rec[k] = int(v)
        elif k.startswith("energy_rank_") and isinstance(v, float) and math.isfinite(v):
            rec[k] = int(v)
        else:
            rec[k] = v
    return rec


def _analyze_cached(run, cache, b: Checkpoint, name: str, buf, params, f64: bool, path: str) -> dict:
    """``run(**kw)`` is the core's analyze_dense/analyze_factored on this tensor; with a cache, W_base's
    decomposition is read from it when present and stored after computing it otherwise."""
    if cache is None:
        raw = run()
        raw["base_svd_cached"] = False
        return raw
    bi = b.tensors[name]
    key = cache.key(b, name, buf, params, f64, path)
    found = cache.load(key, bi.shape[0], bi.shape[1], f64)
    if found is not None:
        try:
            raw = run(base_decomposition=found)
            raw["base_svd_cached"] = True
            return raw
        except ValueError as exc:  # the core refused the entry: recompute, and overwrite it below
            cache.note(f"{name}: cached decomposition refused ({exc}); recomputed")
    raw, dec = run(return_base=True)
    cache.store(key, dec, name)
    raw["base_svd_cached"] = False
    return raw


def _compare_dense(b: Checkpoint, t: Checkpoint, opts: Options, scheme: str, progress, on_preflight, cache=None):
    pre = preflight(b, t, opts)
    if on_preflight:
        on_preflight(pre)
    skipped = preflight_skips(pre)
    records, more, done_bytes = analyze_pairs(b, t, pre.pairs, opts, scheme, progress, cache)
    return records, skipped + more, pre, done_bytes


def preflight_skips(pre: Preflight) -> list[dict]:
    """The skipped entries pairing found (before any tensor is read), in the order compare() reports them."""
    skipped = [{"name": n, "reason": "only in base"} for n in pre.only_in_base]
    skipped += [{"name": n, "reason": "only in tuned"} for n in pre.only_in_tuned]
    skipped += [{"name": m["name"], "reason": f"shape mismatch: base {m['base']} vs tuned {m['tuned']}"}
                for m in pre.shape_mismatch]
    skipped += [dict(m) for m in pre.not_matrix]
    return skipped


def analyze_pairs(b: Checkpoint, t: Checkpoint, names: list[str], opts: Options, scheme: str, progress=None,
                  cache=None) -> tuple[list[dict], list[dict], int]:
    """The records of the tensor pairs ``names`` (paired by :func:`preflight`), in that order, and the ones
    skipped while computing (non-finite values); returns ``(records, skipped, bytes_read)``. Each tensor's
    numbers depend only on its own data, its name and the options, so any subset gives the same records as
    the whole (how ``--ray`` splits a comparison)."""
    records, skipped = [], []
    total_bytes = sum(b.tensors[n].nbytes + t.tensors[n].nbytes for n in names)
    done_bytes = 0
    f64 = opts.dtype == "f64"
    for i, name in enumerate(names):
        bi, ti = b.tensors[name], t.tensors[name]
        if i + 1 < len(names):  # prefetch the next pair while this one computes
            b.advise(names[i + 1], "willneed")
            t.advise(names[i + 1], "willneed")
        bbuf, tbuf = b.buffer(name), t.buffer(name)
        if len(bi.shape) == 2:
            ni = name_info(name, scheme)
            params = _params(opts, name, ni.transposed)

            def run(**kw):
                return _core.analyze_dense(bbuf, bi.dtype, tbuf, ti.dtype, bi.shape[0], bi.shape[1], params, f64, **kw)

            raw = _analyze_cached(run, cache, b, name, bbuf, params, f64, "dense")
        else:
            n = int(np.prod(bi.shape)) if bi.shape else 1
            raw = _core.analyze_norms(bbuf, bi.dtype, tbuf, ti.dtype, n)
        del bbuf, tbuf
        b.advise(name, "dontneed")  # keep resident memory bounded by a few tensors
        t.advise(name, "dontneed")
        _finish(name, bi.shape, bi, ti, scheme, raw, records, skipped)
        done_bytes += bi.nbytes + ti.nbytes
        if progress:
            progress(i + 1, len(names), done_bytes, total_bytes, name)
    return records, skipped, done_bytes


def _finish(name, shape, bi, ti, scheme, raw, records, skipped):
    if "skip_reason" in raw:
        skipped.append({"name": name, "reason": raw["skip_reason"], "nonfinite": int(raw.get("nonfinite", 0))})
    else:
        records.append(_record(name, shape, bi, ti, scheme, raw))


def _compare_adapter(b: Checkpoint, t: PeftAdapter, opts: Options, scheme: str, progress, on_preflight,
                     cache=None):
    """ΔW = scale · B · A per target module, analysed from its factors (never forming B·A)."""
    pre, skipped = adapter_preflight(b, t, opts, scheme)
    if on_preflight:
        on_preflight(pre)
    records, more, done_bytes = analyze_targets(b, t, pre.pairs, opts, scheme, progress, cache)
    return records, skipped + more, pre, done_bytes


def adapter_preflight(b: Checkpoint, t: PeftAdapter, opts: Options, scheme: str) -> tuple[Preflight, list[dict]]:
    """Pair an adapter's targets with the base tensors (headers only): the :class:`Preflight` (``pairs``: the
    base names of the targets to analyse) and the skipped entries."""
    pre = Preflight()
    inc = re.compile(opts.include) if opts.include else None
    exc = re.compile(opts.exclude) if opts.exclude else None
    skipped, todo = [], []
    for tg in t.targets:
        if (inc and not inc.search(tg.base_name)) or (exc and exc.search(tg.base_name)):
            pre.filtered_out += 1
            continue
        if tg.base_name not in b.tensors:
            pre.only_in_tuned.append(tg.base_name)
            continue
        bi = b.tensors[tg.base_name]
        a_shape, b_shape = t.tensors[tg.a_name].shape, t.tensors[tg.b_name].shape
        ni = name_info(tg.base_name, scheme)
        out_in = (bi.shape[1], bi.shape[0]) if ni.transposed else tuple(bi.shape)
        if len(bi.shape) != 2 or out_in != (b_shape[0], a_shape[1]):
            pre.shape_mismatch.append({"name": tg.base_name, "base": list(bi.shape),
                                       "tuned": [b_shape[0], a_shape[1]]})
            continue
        todo.append(tg)
    skipped += [{"name": n, "reason": "adapter targets a tensor not in base"} for n in pre.only_in_tuned]
    skipped += [{"name": m["name"], "reason": f"shape mismatch: base {m['base']} vs adapter B·A {m['tuned']}"}
                for m in pre.shape_mismatch]
    if not todo:
        raise ShapeMismatchError(f"{t.path}: no adapter target matches a tensor of {b.path}"
                                 + (f" (e.g. '{t.targets[0].base_name}')" if t.targets else ""))
    if opts.strict and (pre.only_in_tuned or pre.shape_mismatch):
        raise ShapeMismatchError("--strict: " + "; ".join(s["name"] + ": " + s["reason"] for s in skipped))
    pre.pairs = [tg.base_name for tg in todo]
    return pre, skipped


def analyze_targets(b: Checkpoint, t: PeftAdapter, names: list[str], opts: Options, scheme: str, progress=None,
                    cache=None) -> tuple[list[dict], list[dict], int]:
    """:func:`analyze_pairs` for an adapter: the records of the targets whose base tensors are ``names``."""
    wanted = set(names)
    todo = [tg for tg in t.targets if tg.base_name in wanted]  # names keep the targets' order
    records, skipped = [], []
    f64 = opts.dtype == "f64"
    total_bytes = sum(b.tensors[tg.base_name].nbytes for tg in todo)
    done_bytes = 0
    for i, tg in enumerate(todo):
        bi = b.tensors[tg.base_name]
        ni = name_info(tg.base_name, scheme)
        A = t.weights.read(tg.a_name, opts.dtype)  # (r, in)
        B = t.weights.read(tg.b_name, opts.dtype)  # (out, r)
        # Stored ΔW = L·R: Linear (out, in) -> L = s·B, R = A; Conv1D (in, out) -> L = Aᵀ, R = s·Bᵀ.
        if ni.transposed:
            L, R = np.ascontiguousarray(A.T), np.ascontiguousarray(tg.scale * B.T)
        else:
            L, R = np.ascontiguousarray(tg.scale * B), A
        bbuf = b.buffer(tg.base_name)
        params = _params(opts, tg.base_name, ni.transposed)
        Lc = L.astype(np.float64 if f64 else np.float32, copy=False)
        Rc = R.astype(np.float64 if f64 else np.float32, copy=False)

        def run(**kw):
            return _core.analyze_factored(bbuf, bi.dtype, bi.shape[0], bi.shape[1], Lc, Rc, params, **kw)

        raw = _analyze_cached(run, cache, b, tg.base_name, bbuf, params, f64, "factored")
        del bbuf
        b.advise(tg.base_name, "dontneed")
        raw["lora_rank"] = int(tg.rank)
        raw["lora_scale"] = float(tg.scale)
        ti = t.tensors[tg.a_name]
        _finish(tg.base_name, bi.shape, bi, ti, scheme, raw, records, skipped)
        done_bytes += bi.nbytes
        if progress:
            progress(i + 1, len(todo), done_bytes, total_bytes, tg.base_name)
    return records, skipped, done_bytes

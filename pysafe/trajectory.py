"""track(): the engine's per-matrix records of every checkpoint of a training run against one base.

Each checkpoint is compared with the base exactly as :func:`pysafe.compare` compares a pair (same options,
same records). W_base's decompositions are the same for every checkpoint, so they go through the base
cache (:mod:`pysafe.svdcache`): the first checkpoint computes and stores them, the others read them, and
the records are bit for bit those of separate uncached comparisons. With ``ray=ADDRESS`` the checkpoints
are compared by the workers of a Ray cluster, one task each (:mod:`pysafe.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pysafe.checkpoint import step_dirs
from pysafe.records import scalars
from pysafe.svdcache import open_cache
from pysafe.weights import Comparison, Options, compare

#: the layout version of track.json (and of :meth:`Trajectory.rows`)
SCHEMA_VERSION = 1
#: per-matrix values that describe the run rather than the checkpoint: left out of the tidy rows
_NOT_METRICS = ("time_", "layer")


@dataclass
class TrackPoint:
    """One checkpoint of a trajectory: where it is, its step (from its config.json) and its comparison."""

    index: int
    step: int | None
    label: str
    path: str
    comparison: Comparison
    drift: dict | None = None  # whole-model drift against the aligned reference (track(aligned=...)), else None

    @property
    def records(self) -> list[dict]:
        return self.comparison.records

    def summary(self) -> dict:
        """Whole-model numbers of this checkpoint (see :func:`whole_model`)."""
        return whole_model(self.comparison)


@dataclass
class Trajectory:
    """Result of :func:`track`: one :class:`TrackPoint` per checkpoint, in trajectory order."""

    base: dict
    params: dict
    points: list[TrackPoint]
    scheme: str
    seconds: float = 0.0
    cache: dict | None = None  # hits, misses, writes over the whole trajectory (None: no cache)
    ray: str | None = None  # the cluster address when run with ray=
    aligned: str | None = None  # the aligned reference of the drift numbers (track(aligned=...)), else None

    def __repr__(self) -> str:
        steps = [p.step for p in self.points]
        return (f"Trajectory({len(self.points)} checkpoints, steps {steps[0]}..{steps[-1]}, "
                f"{len(self.points[0].records) if self.points else 0} tensors each, {self.seconds:.1f} s)")

    def rows(self) -> Iterator[dict]:
        """Tidy rows, one per checkpoint × tensor × metric: index, step, label, name, layer, module, metric,
        value. The metrics are the records' finite numeric scalars (timings left out) plus ``sin_theta_*_mean``, the
        mean of the per-direction sin θ array (the number the chance level ``sin_theta_*_chance`` is for)."""
        for p in self.points:
            for rec in p.records:
                head = {"index": p.index, "step": p.step, "label": p.label, "name": rec["name"],
                        "layer": rec.get("layer"), "module": rec.get("module") or ""}
                for k, v in matrix_metrics(rec).items():
                    yield {**head, "metric": k, "value": v}
            for k, v in (p.drift or {}).items():  # whole-model drift: one row per number, name "(model)"
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    yield {"index": p.index, "step": p.step, "label": p.label, "name": "(model)", "layer": None,
                           "module": "", "metric": "drift_" + k, "value": float(v)}

    def to_pandas(self):
        """:meth:`rows` as a pandas DataFrame. Needs pandas: ``pip install "pysafe[pandas]"``."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError('Trajectory.to_pandas() needs pandas, which is not installed: '
                              'pip install "pysafe[pandas]" (or pip install pandas)') from None
        return pd.DataFrame(list(self.rows()))


def matrix_metrics(rec: dict) -> dict:
    """The numeric scalars of one record with a finite value (an undefined one, NaN, is left out, as are
    booleans and strings), with the mean sin θ of each side when the record has the per-direction array."""
    out = {}
    for k, v in scalars(rec).items():
        if k.startswith(_NOT_METRICS) or isinstance(v, (bool, str, list)) or v is None:
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v):
            out[k] = float(v)
    for side in ("left", "right"):
        a = rec.get(f"sin_theta_{side}")
        if a is not None and len(a):
            out[f"sin_theta_{side}_mean"] = float(np.mean(a))
    return out


def _median(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.median(v) if v else float("nan")


def _mean(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


def whole_model(cmp: Comparison) -> dict:
    """Whole-model numbers of one comparison: ‖ΔW‖_F and ‖W_base‖_F over every analysed tensor (the root of
    the summed squares) and their ratio; over the 2-D matrices, the median ‖ΔW‖/‖W_base‖, the median
    effective rank of ΔW as a share of min(out, in), and the means of sin θ (left, right) and of the null
    fraction (left) with the means of their chance levels."""
    recs = cmp.records
    mats = [r for r in recs if len(r.get("shape", [])) == 2]
    d2 = sum((r.get("delta_fro") or 0.0) ** 2 for r in recs)
    b2 = sum((r.get("base_fro") or 0.0) ** 2 for r in recs)
    out = {"tensors": len(recs), "matrices": len(mats), "skipped": len(cmp.skipped),
           "delta_fro": math.sqrt(d2), "base_fro": math.sqrt(b2),
           "delta_rel": math.sqrt(d2 / b2) if b2 > 0 else float("nan"),
           "delta_rel_median": _median(r.get("delta_rel") for r in mats),
           "effective_rank_share_median": _median((r["effective_rank_delta"] / min(r["shape"]))
                                                  if r.get("effective_rank_delta") is not None else None
                                                  for r in mats)}
    for side in ("left", "right"):
        with_dirs = [r for r in mats if r.get(f"sin_theta_{side}") is not None and len(r[f"sin_theta_{side}"])]
        out[f"sin_theta_{side}_mean"] = _mean(float(np.mean(r[f"sin_theta_{side}"])) for r in with_dirs)
        out[f"sin_theta_{side}_chance_mean"] = _mean(r.get(f"sin_theta_{side}_chance") for r in with_dirs)
    out["null_frac_left_mean"] = _mean(r.get("null_frac_left") for r in mats)
    out["null_frac_left_chance_mean"] = _mean(r.get("null_frac_left_chance") for r in mats
                                              if r.get("null_frac_left") is not None
                                              and math.isfinite(r["null_frac_left"]))
    return out


def checkpoint_step(path) -> int | None:
    """The training step a checkpoint directory's config.json records (``step``, else ``steps_done``), or
    None (no config.json, or no step in it)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    for key in ("step", "steps_done"):
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pth", "*.pt")


def expand_checkpoints(ckpts) -> list[tuple[str, int | None]]:
    """``(path, step)`` of every checkpoint of a trajectory: a run directory holding ``steps/step_N``
    contributes those, by step, and itself after them when its own step is not among them (a run whose last
    step was not a multiple of --keep-every); any other path is one checkpoint. Order otherwise as given.

    Raises:
        FileNotFoundError: a path does not exist (checked for all before any work).
        ValueError: no checkpoint given.
    """
    if isinstance(ckpts, (str, os.PathLike)):
        ckpts = [ckpts]
    ckpts = list(ckpts)
    if not ckpts:
        raise ValueError("track needs at least one checkpoint besides the base")
    for c in ckpts:
        if not Path(c).exists():
            raise FileNotFoundError(f"{c}: no such file or directory")
    out = []
    for c in ckpts:
        kept = step_dirs(c) if Path(c).is_dir() else []
        out += [(str(p), s) for s, p in kept]
        own = checkpoint_step(c)
        has_weights = Path(c).is_file() or any(any(Path(c).glob(g)) for g in _WEIGHT_GLOBS)
        if not kept or (has_weights and own not in {s for s, _ in kept}):
            out.append((str(c), own))
    return out


ProgressFn = Callable[[int, int, str], None]


def track(base, ckpts, *, labels: list[str] | None = None, cache=None, ray: str | None = None,
          progress: ProgressFn | None = None, aligned=None, **options) -> Trajectory:
    """Compare every checkpoint of a trajectory with ``base`` (docs/track.md).

    Args:
        base: the reference checkpoint (usually the model training started from).
        ckpts: checkpoint paths in trajectory order, or a run directory holding ``steps/step_N`` (by step;
            see :func:`expand_checkpoints`). Each checkpoint's step is read from its config.json when it has one.
        labels: one label per checkpoint (after expansion); default ``step N``, else the directory name.
        cache: W_base's decompositions (:mod:`pysafe.svdcache`): None (default) for a temporary cache that
            lives for this call (the base SVDs are computed once for the whole trajectory), False for none,
            True for the user's cache directory, a directory, or a ``BaseCache``.
        ray: a Ray cluster address (``local``, ``local:N``, ``auto``, ``HOST:PORT``): one task per checkpoint
            (needs ``pysafe[ray]``); the records are those of the local run.
        progress: called as ``progress(done, total, label)`` after each checkpoint.
        aligned: an aligned (safety-tuned) version of ``base`` of which the checkpoints are further fine-tunes:
            each checkpoint's whole-model drift against the alignment change (:func:`pysafe.drift` with
            BASE = ``base``, ALIGNED = ``aligned``, TUNED = the checkpoint; its summary's "model" numbers and
            verdict in ``TrackPoint.drift``), computed in this process after the comparisons.
        **options: any field of :class:`pysafe.Options`, as for :func:`pysafe.compare`.

    Returns:
        A :class:`Trajectory`.
    """
    if aligned is not None and not Path(aligned).exists():
        raise FileNotFoundError(f"{aligned}: no such file or directory")
    opts = Options(**options)
    opts.validate()
    items = expand_checkpoints(ckpts)
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"labels: {len(labels)} given for {len(items)} checkpoints")
    names = list(labels) if labels is not None else [_label(p, s) for p, s in items]
    if not Path(base).exists():
        raise FileNotFoundError(f"{base}: no such file or directory")
    t0 = time.perf_counter()
    temporary = cache is None
    with contextlib.ExitStack() as stack:
        if temporary:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="pysafe-track-cache-"))
        bc = open_cache(cache)
        before = bc.summary() if bc is not None else None
        paths = [p for p, _ in items]
        if ray is not None:
            from pysafe.distributed import compare_many_on_ray

            cmps = compare_many_on_ray(base, paths, ray, cache=bc if bc is not None else False,
                                       progress=(lambda d, n, i: progress(d, n, names[i])) if progress else None,
                                       **asdict(opts))
        else:
            cmps = []
            for i, (p, _) in enumerate(items):
                cmps.append(compare(base, p, cache=bc if bc is not None else False, **asdict(opts)))
                if progress:
                    progress(i + 1, len(items), names[i])
        cache_summary = bc.summary(since=before) if bc is not None else None
        if cache_summary is not None and temporary:
            cache_summary["dir"] = None  # a temporary directory, gone after this call
    points = [TrackPoint(i, s, names[i], str(Path(p).resolve()), c) for i, ((p, s), c) in enumerate(zip(items, cmps))]
    if aligned is not None:
        from pysafe.drift import AlignmentMemo, drift

        memo = AlignmentMemo()  # the alignment side (ΔA's SVDs, the intruder control) once for all points
        for pt in points:
            res = drift(base, aligned, pt.path, include=opts.include, device=opts.device, memo=memo)
            pt.drift = {**res.summary["model"], "verdict": res.summary.get("verdict")}
    return Trajectory(base=cmps[0].base, params=asdict(opts), points=points, scheme=cmps[0].scheme,
                      seconds=time.perf_counter() - t0, cache=cache_summary, ray=ray,
                      aligned=None if aligned is None else str(Path(aligned).resolve()))


def _label(path: str, step: int | None) -> str:
    return f"step {step}" if step is not None else Path(path).name

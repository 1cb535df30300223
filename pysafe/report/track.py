"""Writing a trajectory (``pysafe track``) to disk: track.json, track.csv, plots/track_*.png, index.html.

track.json holds, per checkpoint, its step, label and path, the whole-model summary and every per-matrix
record (arrays cut as in summary.json); track.csv is the same numbers as tidy rows, one per checkpoint ×
tensor × metric; the plots follow the main metrics over the steps, one line per module type. The folder is
written whole and swapped into place like every pysafe report (:func:`pysafe._atomic.atomic_dir`).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from pysafe._atomic import atomic_dir, json_ready, write_json
from pysafe._figures import OKABE_ITO, pyplot, save_figure
from pysafe.checkpoint import MODULE_ORDER
from pysafe.report.html import write_index
from pysafe.report.summary import record_json, stamp

#: track.json layout version (the engine's records inside follow summary.json's schema_version 2)
TRACK_SCHEMA_VERSION = 1
#: the per-matrix metrics plotted over the steps: file stem -> (record key, title, y label)
TRACK_PLOTS = {
    "track_delta_rel": ("delta_rel", "How much the weights moved: ‖ΔW‖ / ‖W_base‖", "relative change (mean)"),
    "track_effective_rank": ("effective_rank_delta", "Effective rank of ΔW", "effective rank (mean)"),
    "track_energy_rank": ("energy_rank_90_delta", "Directions holding 90% of ΔW's energy",
                          "energy rank k at 90% (mean)"),
    "track_sin_theta": ("sin_theta", "sin θ of ΔW's top directions to W_base's top-k space, against chance",
                        "mean sin θ (dashed: chance)"),
}
#: with an aligned reference (``track --aligned``): the whole-model drift over the steps
DRIFT_PLOT = "track_drift"
TRACK_FILES = ("index.html", "track.json", "track.csv") + tuple(f"plots/{p}.png" for p in TRACK_PLOTS)
CSV_COLUMNS = ("index", "step", "label", "name", "layer", "module", "metric", "value")


def track_dict(traj) -> dict:
    """The content of track.json for a :class:`~pysafe.trajectory.Trajectory`."""
    return {
        **stamp(TRACK_SCHEMA_VERSION),
        "base": traj.base,
        "params": json_ready(traj.params),
        "scheme": traj.scheme,
        "seconds": round(traj.seconds, 3),
        "cache": traj.cache,
        "ray": traj.ray,
        "aligned": traj.aligned,
        "checkpoints": [{
            "index": p.index, "step": p.step, "label": p.label, "path": p.path, "tuned": p.comparison.tuned,
            "seconds": round(p.comparison.seconds, 3), "summary": json_ready(p.summary()),
            "matrices": [record_json(r) for r in p.records], "skipped": json_ready(p.comparison.skipped),
            **({"drift": json_ready(p.drift)} if p.drift is not None else {}),
        } for p in traj.points],
    }


def write_csv(traj, path: str | os.PathLike) -> Path:
    """track.csv: :meth:`Trajectory.rows` with a header line (empty cells for a missing step or layer)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for row in traj.rows():
            w.writerow(["" if row[c] is None else (repr(row[c]) if c == "value" else row[c]) for c in CSV_COLUMNS])
    return path


def _groups(matrices: list[dict]) -> list[str]:
    mods = {(r.get("module") or "other") for r in matrices}
    return [m for m in MODULE_ORDER if m in mods] + sorted(m for m in mods if m not in MODULE_ORDER)


def _per_module(doc: dict, key: str) -> dict[str, np.ndarray]:
    """{module type: mean of ``key`` over its matrices at each checkpoint} from track.json's content (NaN
    where no matrix of that type has the value). ``sin_theta_left`` / ``_right`` average each matrix's
    per-direction array first; their ``_chance`` keys are plain record keys."""
    pts = doc["checkpoints"]
    mats = [r for p in pts for r in p["matrices"] if len(r.get("shape", [])) == 2]
    out = {}
    for g in _groups(mats):
        vals = []
        for p in pts:
            xs = []
            for r in p["matrices"]:
                if len(r.get("shape", [])) != 2 or (r.get("module") or "other") != g:
                    continue
                v = r.get(key)
                if isinstance(v, list):
                    v = float(np.mean(v)) if v else None
                if v is not None and math.isfinite(v):
                    xs.append(v)
            vals.append(sum(xs) / len(xs) if xs else float("nan"))
        out[g] = np.asarray(vals)
    return out


def x_axis(doc: dict) -> tuple[np.ndarray, str, list[str] | None]:
    """The x values (the steps when every checkpoint has one and they increase, else the positions), the axis
    label, and tick labels."""
    pts = doc["checkpoints"]
    steps = [p.get("step") for p in pts]
    if all(isinstance(s, int) for s in steps) and all(a < b for a, b in zip(steps, steps[1:])):
        return np.asarray(steps, dtype=float), "training step", None
    return np.arange(len(pts), dtype=float), "checkpoint (in the order given)", [p["label"] for p in pts]


_COLORS = [OKABE_ITO[k] for k in ("blue", "orange", "green", "vermillion", "purple", "sky", "black", "yellow", "grey")]


def write_track_plots(doc: dict, out: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """plots/track_*.png from track.json's content; returns the files written."""
    plt = pyplot()
    out = Path(out)
    x, xlabel, ticks = x_axis(doc)
    written = []
    for stem, (key, title, ylabel) in TRACK_PLOTS.items():
        sides = ("left", "right") if key == "sin_theta" else (None,)
        fig, axes = plt.subplots(1, len(sides), figsize=(5.2 * len(sides) + 1.6, 3.6), squeeze=False)
        drawn = False
        for ax, side in zip(axes.flat, sides):
            k = f"{key}_{side}" if side else key
            series = _per_module(doc, k)
            chance = _per_module(doc, k + "_chance") if side else {}
            for i, (g, y) in enumerate(series.items()):
                if not np.isfinite(y).any():
                    continue
                c = _COLORS[i % len(_COLORS)]
                ax.plot(x, y, color=c, marker="o", ms=3, lw=1.3, label=g)
                if g in chance and np.isfinite(chance[g]).any():
                    ax.plot(x, chance[g], color=c, ls="--", lw=1.0)
                drawn = True
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if side:
                ax.set_title(f"{'column (output)' if side == 'left' else 'row (input)'} side", fontsize=9)
            if ticks is not None:
                ax.set_xticks(x, ticks, rotation=30, ha="right", fontsize=7)
        if drawn:
            axes.flat[len(sides) - 1].legend(title="module", fontsize=7, title_fontsize=8, loc="upper left",
                                             bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, out / f"{stem}.png", run_id=run_id))
    return written


def write_drift_plot(doc: dict, out: str | os.PathLike, run_id: str | None = None) -> Path | None:
    """plots/track_drift.png when the checkpoints carry drift numbers (``track --aligned``): the share of the
    alignment change undone and ΔT's energy in ΔA's top subspace as a multiple of chance, each with its 95%
    bootstrap interval over matrices; None when there is nothing to draw."""
    pts = doc["checkpoints"]
    if not any(isinstance(p.get("drift"), dict) for p in pts):
        return None
    plt = pyplot()
    x, xlabel, ticks = x_axis(doc)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.6))
    for ax, key, ylabel, ref in ((axes[0], "undo", "share of ΔA undone", 0.0),
                                 (axes[1], "energy_both_ratio", "ΔT energy in ΔA's subspace (× chance)", 1.0)):
        def val(p, k):
            v = (p.get("drift") or {}).get(k)
            return float("nan") if v is None else float(v)

        y = np.array([val(p, key) for p in pts])
        ci = [(p.get("drift") or {}).get(key + "_ci95") or [None, None] for p in pts]
        lo = np.array([float("nan") if c[0] is None else c[0] for c in ci])
        hi = np.array([float("nan") if c[1] is None else c[1] for c in ci])
        ax.fill_between(x, lo, hi, color=OKABE_ITO["sky"], alpha=0.35, lw=0, label="95% interval")
        ax.plot(x, y, color=OKABE_ITO["blue"], marker="o", ms=3, lw=1.3, label="whole model")
        ax.axhline(ref, color=OKABE_ITO["grey"], ls="--", lw=1.0, label="random ΔT" if ref else "none undone")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ticks is not None:
            ax.set_xticks(x, ticks, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle("Drift against the alignment change over the checkpoints", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out) / f"{DRIFT_PLOT}.png", run_id=run_id)


def write_track_files(traj, directory: str | os.PathLike, *, run_id: str | None = None,
                      plots: bool = True) -> Path:
    """Write track.json, track.csv, plots/ and index.html into ``directory`` (no staging: a folder being built)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = track_dict(traj)
    if run_id is not None:
        doc["run_id"] = run_id
    write_csv(traj, d / "track.csv")
    (d / "plots").mkdir(exist_ok=True)
    if plots:
        write_track_plots(doc, d / "plots", run_id=run_id)
        write_drift_plot(doc, d / "plots", run_id=run_id)
    write_json(d / "track.json", doc, indent=1)
    write_index(d)
    return d


def write_track_report(traj, out: str | os.PathLike, *, overwrite: bool = False, plots: bool = True,
                       log=None) -> Path:
    """track.json, track.csv, plots/ and index.html for a :class:`~pysafe.trajectory.Trajectory`, atomically
    (the rules of every report folder: docs/report-directory.md).

    Raises:
        FileExistsError: ``out`` already holds files and ``overwrite`` is false.
        OSError: ``out`` cannot be written; ``out`` is unchanged.
    """
    with atomic_dir(out, overwrite=overwrite, planned=TRACK_FILES, log=log) as stage:
        write_track_files(traj, stage.path, run_id=stage.run_id, plots=plots)
    return Path(out)

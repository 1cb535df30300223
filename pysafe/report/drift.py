"""The files of ``pysafe drift``: drift.json (records, summary, settings), drift.csv (one row per matrix) and
plots/drift_energy.png, plots/drift_undo.png (docs/drift.md); index.html's Drift section is in html.py."""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from pathlib import Path

import numpy as np

from pysafe._atomic import json_ready, write_json
from pysafe._figures import OKABE_ITO, pyplot, save_figure
from pysafe._version import __version__

#: drift.json layout version
DRIFT_SCHEMA_VERSION = 1
DRIFT_PLOTS = ("drift_energy.png", "drift_undo.png")
#: the files of a drift report (relative paths)
DRIFT_FILES = ("index.html", "drift.json", "drift.csv") + tuple(f"plots/{p}" for p in DRIFT_PLOTS)


def drift_dict(res, run_id: str | None = None) -> dict:
    """drift.json's content for a :class:`pysafe.drift.DriftResult`."""
    out = {"schema_version": DRIFT_SCHEMA_VERSION, "pysafe_version": __version__,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "base": res.base, "aligned": res.aligned, "tuned": res.tuned, "params": res.params,
           "scheme": res.scheme, "seconds": round(res.seconds, 3), "summary": res.summary,
           "matrices": res.records, "skipped": res.skipped}
    if run_id is not None:
        out["run_id"] = run_id
    return json_ready(out)


def write_csv(records: list[dict], path) -> None:
    """One row per matrix; list values (intruder indices and cosines) joined by ';'."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow({k: ";".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
                        if isinstance(v, list) and k != "shape" else
                        ("x".join(map(str, v)) if k in ("shape", "stored_shape") else _cell(v))
                        for k, v in r.items()})
    os.replace(tmp, path)


def _cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    return v


def write_drift_plots(summary: dict, out, run_id: str | None = None) -> list[Path]:
    """Per layer: the share of ΔT's energy in ΔA's subspaces against chance, and the undo fraction."""
    layers = summary.get("by_layer") or {}
    if not layers:
        return []
    plt = pyplot()
    out = Path(out)
    xs = [int(k) for k in layers]
    written = []
    fig, ax = plt.subplots(figsize=(8.6, 3.8))
    for j, (side, words, color) in enumerate((("both", "both sides", OKABE_ITO["vermillion"]),
                                               ("left", "column space", OKABE_ITO["blue"]),
                                               ("right", "row space", OKABE_ITO["green"]))):
        key = f"energy_{side}"
        v = np.array([g.get(key, np.nan) for g in layers.values()], dtype=float)
        ci = [g.get(key + "_ci95") or [np.nan, np.nan] for g in layers.values()]
        lo = np.array([c[0] for c in ci], dtype=float)
        hi = np.array([c[1] for c in ci], dtype=float)
        x = np.array(xs) + (j - 1) * 0.12
        yerr = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.errorbar(x, v, yerr=np.nan_to_num(yerr), fmt="o", color=color, ms=4, capsize=2,
                    label=f"ΔT's energy in ΔA's top {words}")
        ch = np.array([g.get(key + "_chance", np.nan) for g in layers.values()], dtype=float)
        ax.plot(x, ch, "_", color=color, ms=12, mew=2, label=f"chance ({words})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0-based, as in the tensor names)")
    ax.set_ylabel("share of ‖ΔT‖² (log scale)")
    ax.set_xticks(xs)
    ax.set_title("Share of ΔT's energy in ΔA's top directions\n(95% bootstrap interval over the layer's "
                 "matrices; dashes: chance)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written.append(save_figure(fig, out / "drift_energy.png", run_id=run_id))

    fig, ax = plt.subplots(figsize=(8.6, 3.6))
    v = np.array([g.get("undo", np.nan) for g in layers.values()], dtype=float)
    ci = [g.get("undo_ci95") or [np.nan, np.nan] for g in layers.values()]
    lo, hi = np.array([c[0] for c in ci], dtype=float), np.array([c[1] for c in ci], dtype=float)
    sd = np.array([g.get("undo_chance_sd") or np.nan for g in layers.values()], dtype=float)
    ax.fill_between(xs, -2 * sd, 2 * sd, color=OKABE_ITO["grey"], alpha=0.3, step="mid",
                    label="random ΔT: 0 ± 2 sd")
    ax.axhline(0, color="black", lw=0.8)
    yerr = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
    ax.errorbar(xs, v, yerr=np.nan_to_num(yerr), fmt="o", color=OKABE_ITO["vermillion"], ms=5, capsize=3,
                label="undo = −⟨ΔT, ΔA⟩ / ‖ΔA‖²")
    ax.set_xticks(xs)
    ax.set_xlabel("layer (0-based, as in the tensor names)")
    ax.set_ylabel("fraction of ΔA undone")
    ax.set_title("Fraction of the alignment change ΔA that ΔT cancels\n(1: all; negative: reinforces it; "
                 "95% bootstrap interval over the layer's matrices)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written.append(save_figure(fig, out / "drift_undo.png", run_id=run_id))
    return written


def write_drift_files(res, directory, *, run_id: str | None = None, plots: bool = True) -> Path:
    """drift.json, drift.csv, plots/ and index.html into ``directory`` (a directory being built)."""
    from pysafe.report.html import write_index

    d = Path(directory)
    (d / "plots").mkdir(parents=True, exist_ok=True)
    data = drift_dict(res, run_id)
    write_csv(data["matrices"], d / "drift.csv")
    if plots:
        write_drift_plots(data["summary"], d / "plots", run_id=run_id)
    write_json(d / "drift.json", data, indent=1)
    write_index(d)
    return d

"""plots/*.png: singular-value decay per module type, and layer × module heatmaps."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pysafe.checkpoint import MODULE_ORDER

HEATMAP_KEYS = ("delta_rel", "null_frac_left", "overlap_left", "effective_rank_delta")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (shared by every pysafe plot)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110, run_id: str | None = None) -> Path:
    """Save ``fig`` to ``path`` (creating its folder) and close it; ``run_id`` goes into the PNG's text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi, metadata={"pysafe_run_id": run_id} if run_id else None)
    except OSError as exc:  # name the file: a failed write of the report says where
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        pyplot().close(fig)
    return path


#: the files write_plots may write (a report's plots/ folder holds no other file of pysafe's)
PLOT_FILES = ("sv_decay.png",) + tuple(f"heatmap_{k}.png" for k in HEATMAP_KEYS)


def write_plots(cmp, out: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Write the decay plot and the four heatmaps; returns the files written."""
    out = Path(out)
    plt = pyplot()
    written = []
    recs = [r for r in cmp.records if "sv_delta" in r]
    # the decay plot shows matrices that changed; unchanged ones (σ_1 = 0) have no spectrum to draw
    changed = [r for r in recs if len(r["sv_delta"]) and r["sv_delta"][0] > 0]
    if not recs:
        return written
    groups: dict[str, list[dict]] = {}
    for r in changed:
        groups.setdefault(r.get("module") or "other", []).append(r)
    names = [m for m in MODULE_ORDER if m in groups] + sorted(g for g in groups if g not in MODULE_ORDER)
    cols = max(1, min(4, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, mod in zip(axes.flat, names):
        rs = groups[mod]
        layers = [r.get("layer") for r in rs]
        lmax = max([l for l in layers if l is not None] or [1])
        cmap = plt.get_cmap("viridis")
        for r in rs:
            sv = np.asarray(r["sv_delta"], dtype=float)
            if sv.size == 0 or sv[0] <= 0:
                continue
            color = cmap((r["layer"] or 0) / max(1, lmax)) if r.get("layer") is not None else "gray"
            ax.semilogy(np.arange(1, sv.size + 1), sv / sv[0], color=color, lw=0.8)
        ax.set_title(f"ΔW spectrum: {mod}")
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i / σ_1")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    written.append(save_figure(fig, out / "sv_decay.png", run_id=run_id))

    layered = [r for r in recs if r.get("layer") is not None and r.get("module")]
    if layered:
        layers = sorted({r["layer"] for r in layered})
        mods = [m for m in MODULE_ORDER if any(r["module"] == m for r in layered)]
        for key in HEATMAP_KEYS:
            grid = np.full((len(layers), len(mods)), np.nan)
            for r in layered:
                v = r.get(key)
                if v is not None and r["module"] in mods:
                    grid[layers.index(r["layer"]), mods.index(r["module"])] = v
            # A metric with a chance level is drawn as value − chance (each cell against its own
            # chance, which depends on the matrix's shape and k), on a scale centred at chance.
            chance = np.full_like(grid, np.nan)
            for r in layered:
                c = r.get(key + "_chance")
                if c is not None and r["module"] in mods:
                    chance[layers.index(r["layer"]), mods.index(r["module"])] = c
            has_chance = bool(np.isfinite(chance).any())
            fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(mods) * (1.4 if has_chance else 1.0),
                                            1.5 + 0.22 * len(layers)))
            if has_chance:
                shown = grid - chance
                lim = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 1.0
                im = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-max(lim, 1e-12), vmax=max(lim, 1e-12),
                               interpolation="nearest")
                if grid.size <= 160:  # small grids: write value (chance) in each cell
                    for (i, j), v in np.ndenumerate(grid):
                        if np.isfinite(v):
                            ax.text(j, i, f"{v:.2f}\n({chance[i, j]:.2f})", ha="center", va="center", fontsize=6)
            else:
                im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_xticks(range(len(mods)), mods)
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
            ax.set_xlabel("module")
            ax.set_ylabel("layer")
            ax.set_title(f"{key} − chance (cell: value (chance))" if has_chance else key, fontsize=9)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(save_figure(fig, out / f"heatmap_{key}.png", run_id=run_id))
    return written

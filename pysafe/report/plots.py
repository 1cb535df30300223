"""plots/*.png: singular-value decay per module type, and layer × module heatmaps (the figure style
shared by every pysafe figure is in :mod:`pysafe._figures`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pysafe._figures import OKABE_ITO, pyplot, save_figure
from pysafe.checkpoint import MODULE_ORDER

HEATMAP_KEYS = ("delta_rel", "null_frac_left", "overlap_left", "effective_rank_delta")

#: heatmap titles and colour-bar labels, in words
HEATMAP_TITLES = {
    "delta_rel": ("How much each matrix changed: ‖ΔW‖ / ‖W_base‖", "relative change"),
    "null_frac_left": ("Share of ΔW's energy outside W_base's top-k column space, against chance",
                       "value − chance (blue: inside the base's directions)"),
    "overlap_left": ("Overlap of ΔW's and W_base's top column spaces, against chance",
                     "value − chance (red: more aligned than random)"),
    "effective_rank_delta": ("Effective rank of ΔW", "effective rank"),
}

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
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols + 1.2, 3.2 * rows + 0.5), squeeze=False)
    all_layers = [r["layer"] for r in changed if r.get("layer") is not None]
    lmin, lmax = (min(all_layers), max(all_layers)) if all_layers else (0, 1)
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(vmin=lmin, vmax=max(lmax, lmin + 1))
    unlayered = False
    for ax, mod in zip(axes.flat, names):
        for r in groups[mod]:
            sv = np.asarray(r["sv_delta"], dtype=float)
            if sv.size == 0 or sv[0] <= 0:
                continue
            layer = r.get("layer")
            unlayered |= layer is None
            color = cmap(norm(layer)) if layer is not None else OKABE_ITO["grey"]
            ax.semilogy(np.arange(1, sv.size + 1), sv / sv[0], color=color, lw=0.9)
        ax.set_title(f"{mod}", fontsize=9)
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("σ_i / σ_1 of ΔW")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("How fast ΔW's singular values fall, per module type" +
                 (" (grey: matrices without a layer)" if unlayered else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if all_layers:  # the legend of the line colours: a colour bar of the layer (0-based), outside the panels
        cax = fig.add_axes((0.92, 0.15, 0.015, 0.7))
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, cax=cax)
        cb.set_label("layer (0-based)")
        if lmax - lmin <= 12:
            cb.set_ticks(range(lmin, lmax + 1))
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
            title, cbar = HEATMAP_TITLES.get(key, (key.replace("_", " "), key.replace("_", " ")))
            fig, ax = plt.subplots(figsize=(2.6 + 1.0 * len(mods) * (1.3 if has_chance else 1.0),
                                            1.9 + (0.42 if has_chance else 0.3) * len(layers)))
            numbers = grid.size <= 400
            fs = 7 if len(layers) <= 12 else 5
            if has_chance:
                shown = grid - chance
                lim = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 0.0
                lim = max(lim, 0.05)  # at chance everywhere: white, not noise stretched to full colour
                im = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                for (i, j), v in np.ndenumerate(grid):
                    if numbers and np.isfinite(v):
                        dark = abs(shown[i, j]) > 0.6 * lim
                        ax.text(j, i, f"{v:.2f}\n({chance[i, j]:.2f})", ha="center", va="center", fontsize=fs,
                                color="white" if dark else "black")
                title += "\n(cell: value and, in brackets, its chance level)" if numbers else ""
            else:
                im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
                if np.isfinite(grid).any():
                    lo, hi = np.nanmin(grid), np.nanmax(grid)
                    for (i, j), v in np.ndenumerate(grid):
                        if numbers and np.isfinite(v):
                            light = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light at the top
                            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=fs,
                                    color="black" if light else "white")
            ax.set_xticks(range(len(mods)), mods)
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
            ax.set_xlabel("module")
            ax.set_ylabel("layer (0-based, as in the tensor names)")
            ax.set_title(title, fontsize=9)
            cb = fig.colorbar(im, ax=ax)
            cb.set_label(cbar, fontsize=8)
            fig.tight_layout()
            written.append(save_figure(fig, out / f"heatmap_{key}.png", run_id=run_id))
    return written

"""The compact per-layer table printed by ``pysafe analyze``."""

from __future__ import annotations

import math

from pysafe.checkpoint import MODULE_ORDER


def _fmt(v, width=7, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-".rjust(width)
    if abs(v) and (abs(v) < 10 ** -digits or abs(v) >= 1000):
        return f"{v:.1e}".rjust(width)
    return f"{v:.{digits}f}".rjust(width)


def format_table(cmp, keys=("delta_rel", "null_frac_left")) -> str:
    """Rows = layers, columns = modules, one block per metric; unmapped tensors listed after."""
    by_layer: dict[int, dict[str, dict]] = {}
    other = []
    for r in cmp.records:
        if r.get("layer") is None or not r.get("module"):
            other.append(r)
        else:
            by_layer.setdefault(r["layer"], {})[r["module"]] = r
    lines = []
    modules = [m for m in MODULE_ORDER if any(m in mods for mods in by_layer.values())]
    for key in keys:
        if not by_layer:
            break
        chance = ""
        if key + "_chance" in cmp.records[0]:
            vals = [r.get(key + "_chance") for mods in by_layer.values() for r in mods.values()]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            if vals:
                chance = f"  (chance {min(vals):.3f}–{max(vals):.3f})" if min(vals) != max(vals) else \
                    f"  (chance {vals[0]:.3f})"
        lines.append(f"{key}{chance}")
        lines.append("layer " + "".join(m.rjust(8) for m in modules))
        for layer in sorted(by_layer):
            mods = by_layer[layer]
            lines.append(f"{layer:5d} " + "".join(
                (" " + _fmt(mods[m].get(key))) if m in mods else " " * 8 for m in modules))
        lines.append("")
    vectors = [r for r in other if len(r["shape"]) < 2]
    matrices = [r for r in other if len(r["shape"]) == 2]
    if matrices:
        lines.append("other matrices".ljust(41) + "delta_rel".rjust(10) + "null_frac_left".rjust(16))
        for r in matrices[:20]:
            lines.append(f"{r['name'][-40:]:40s} " + _fmt(r.get("delta_rel"), 10) + _fmt(r.get("null_frac_left"), 16))
        if len(matrices) > 20:
            lines.append(f"... and {len(matrices) - 20} more (see summary.json)")
    if vectors:
        top = max(vectors, key=lambda r: r.get("delta_rel") or 0.0)
        changed = sum(1 for r in vectors if r.get("delta_fro"))
        lines.append(f"1-D tensors: {len(vectors)} ({changed} changed), largest delta_rel "
                     f"{_fmt(top.get('delta_rel'), 0).strip()} in {top['name']}")
    return "\n".join(lines).rstrip()

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
        # A metric with a chance level shows each cell as value/chance: the chance depends on the
        # matrix's shape and the k used, so one range for the whole table would compare the wrong pairs.
        has_chance = any(key + "_chance" in r for mods in by_layer.values() for r in mods.values())
        width = 15 if has_chance else 8

        def cell(r):
            if not has_chance:
                return " " + _fmt(r.get(key))
            return " " + (_fmt(r.get(key), 7).strip() + "/" + _fmt(r.get(key + "_chance"), 6).strip()).rjust(width - 1)

        lines.append(f"{key}" + ("  (value/chance per cell)" if has_chance else ""))
        lines.append("layer " + "".join(m.rjust(width) for m in modules))
        for layer in sorted(by_layer):
            mods = by_layer[layer]
            lines.append(f"{layer:5d} " + "".join(cell(mods[m]) if m in mods else " " * width for m in modules))
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

"""The style every pysafe figure shares (reports, analyses): palette, input-group styles, the Agg backend.

Conventions of every figure: layers are numbered from 0, as in the tensor names (``model.layers.0``);
colours come from the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies) or
from viridis/RdBu; legends sit outside the axes; titles are words, not JSON keys.
"""

from __future__ import annotations

from pathlib import Path

#: the Okabe–Ito palette (Okabe & Ito 2008): eight colours told apart with the common colour-vision deficiencies
OKABE_ITO = {"orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442", "blue": "#0072B2",
             "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000", "grey": "#7F7F7F"}
SAFE_COLOR, UNSAFE_COLOR = OKABE_ITO["green"], OKABE_ITO["vermillion"]

_GROUP_STYLES = {  # (colour, line style, marker); keys are the lab's set names (and the older short names)
    "std_safe": (SAFE_COLOR, "-", "o"), "safe": (SAFE_COLOR, "-", "o"),
    "std_unsafe": (UNSAFE_COLOR, "-", "s"), "unsafe": (UNSAFE_COLOR, "-", "s"),
    "jb_co_task": (OKABE_ITO["blue"], "--", "^"), "jb_co_text": (OKABE_ITO["sky"], "--", "v"),
    "jb_mg_tokens": (OKABE_ITO["purple"], "--", "D"), "jb_mg_text": (OKABE_ITO["orange"], "--", "P"),
    "jb_mg_tokens_unsafe_branch": (OKABE_ITO["purple"], ":", "d"), "jb_comp": (OKABE_ITO["grey"], "--", "X"),
}
_EXTRA = [OKABE_ITO[k] for k in ("blue", "orange", "sky", "purple", "yellow", "grey")]


def group_style(name: str, index: int = 0) -> dict:
    """Line style of one input group (a test set or an attack budget) in every pysafe figure."""
    if name in _GROUP_STYLES:
        c, ls, m = _GROUP_STYLES[name]
    elif name.startswith("adv_"):  # attacked inputs: black, one dash pattern per budget
        eps = name.rsplit("_eps", 1)[1] if "_eps" in name else "1"
        ls = {"0.5": ":", "1": "-", "2": "-."}.get(eps, (0, (5, 1, 1, 1)))
        c, m = OKABE_ITO["black"], "*"
    else:
        c, ls, m = _EXTRA[index % len(_EXTRA)], "-.", "o"
    return {"color": c, "linestyle": ls, "marker": m}


def group_label(name: str) -> str:
    """A group's name in words, for legends."""
    words = {"std_safe": "safe", "std_unsafe": "unsafe", "safe": "safe", "unsafe": "unsafe",
             "jb_co_task": "jailbreak: competing objectives (task)", "jb_co_text": "jailbreak: competing objectives (text)",
             "jb_mg_tokens": "jailbreak: mismatched generalisation (tokens)",
             "jb_mg_text": "jailbreak: mismatched generalisation (text)",
             "jb_mg_tokens_unsafe_branch": "jailbreak: mismatched generalisation (tokens, unsafe branch)",
             "jb_comp": "jailbreak: composition", "adv_soft_tokens": "soft-token attack (budget 1×)"}
    if name in words:
        return words[name]
    if name.startswith("adv_soft_tokens_eps"):
        return f"soft-token attack (budget {name.rsplit('_eps', 1)[1]}×)"
    return name


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

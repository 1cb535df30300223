"""``index.html``: one self-contained page per report folder, built from the files in it.

The page is generated from whatever the folder holds, so it works for every command that writes a report
(``pysafe analyze``, ``demo``, ``reproduce``, ``clusters``, ``colspace``, ``rowspace``, ``lipschitz``) and
``pysafe report DIR`` rebuilds it at any time from the files alone. It needs no network and no script:
figures are linked by relative paths (the folder can be moved or zipped as a whole), tables are HTML, and
a print style sheet lays it out for paper.

Every sentence under "Findings" is generated from a number in the folder and cites that number with its
chance level or control and, where the files carry one, its 95% interval.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from pathlib import Path

from pysafe.checkpoint import MODULE_ORDER
from pysafe.drift import percent as _pc

INDEX = "index.html"
#: the mark of a page pysafe wrote (also how a folder without a manifest recognises it)
GENERATOR = '<meta name=generator content="pysafe">'

# -- small helpers ------------------------------------------------------------------------------------


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _load(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a and (a < 10 ** -digits or a >= 10 ** 4):
        return f"{v:.2e}"
    return f"{v:.{digits}g}" if a >= 1 else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def wilson_interval(p: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``p`` observed on ``n`` samples."""
    if not n:
        return (float("nan"), float("nan"))
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ci_text(ci, fmt=_num) -> str:
    if not ci or len(ci) != 2 or any(c is None for c in ci):
        return ""
    return f" [95% interval {fmt(ci[0])} to {fmt(ci[1])}]"


def _rel(p: Path, root: Path) -> str:
    return Path(os.path.relpath(p, root)).as_posix()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- captions: how to read each figure ------------------------------------------------------------------

HEATMAP_WORDS = {
    "delta_rel": "Relative change ‖ΔW‖/‖W_base‖ per layer and module",
    "null_frac_left": "Share of ΔW's energy outside W_base's top-k column space, against chance",
    "overlap_left": "Overlap of ΔW's and W_base's top column spaces, against chance",
    "effective_rank_delta": "Effective rank of ΔW per layer and module",
}

CAPTIONS = {
    "sv_decay.png": "Singular values of ΔW = W_tuned − W_base, divided by the largest, one panel per module type "
                    "and one line per layer (colour bar: layer, 0-based as in the tensor names). A curve that "
                    "drops fast means a low-rank change (a few directions carry it); a flat curve, a change "
                    "spread over many directions, as a full fine-tune gives.",
    "heatmap_delta_rel": "How much each matrix moved: ‖ΔW‖_F / ‖W_base‖_F. The number in each cell is the value; "
                         "darker means a larger change. Compare layers and modules to see where fine-tuning acted.",
    "heatmap_null_frac_left": "Share of ΔW's energy outside W_base's top-k column space. Colour: value minus the "
                              "chance level of that cell (what a random ΔW of the same shape would give; it "
                              "differs between modules of different shapes). Blue: below chance, ΔW stays inside "
                              "the directions the base model already uses; red: above chance, ΔW writes into new "
                              "directions. White: at chance. Each cell prints value and (chance).",
    "heatmap_overlap_left": "Mean squared cosine of the principal angles between ΔW's and W_base's top column spaces. "
                            "Colour: value minus the cell's chance level; red: more aligned than random "
                            "directions would be, blue: less. Each cell prints value and (chance).",
    "heatmap_effective_rank_delta": "Effective rank of ΔW (the exponential of the entropy of its normalised singular "
                                    "values): about 1 for a rank-one change, up to min(out, in) for a flat "
                                    "spectrum. The number in each cell is the value.",
    "clusters.png": "Activation clusters per layer (0-based). Left: cosine τ, right: τ = ‖f − μ_U‖ − ‖f − μ_S‖, "
                    "where μ_S and μ_U are the mean activations of a separate reference set of safe and unsafe "
                    "inputs. Positive means closer to the safe cluster. Solid lines: the safe and unsafe test "
                    "inputs and the attacked inputs; dashed: jailbreak sets; bands: ± one standard deviation. "
                    "A fine-tune that separates safe from unsafe inputs pulls the two solid lines apart; a "
                    "jailbreak that works sits nearer the safe line.",
    "colspace.png": "Column space (paper Fig 4): sin θ of the principal angles between the top left singular "
                    "directions of W_ST (the fine-tuned matrix) and of ΔW and W_IT's (the pretrained matrix's) "
                    "top-k column space, per MLP matrix and layer. The dashed line is the chance level "
                    "(random directions). Values far below it: the fine-tune stays in the space the pretrained "
                    "model already writes to.",
    "rowspace.png": "Row space (paper Fig 5): how strongly safe and unsafe inputs at the MLP input project onto the "
                    "top right singular directions of W_IT, W_ST and ΔW (‖W â‖/σ1 per direction). If ΔW's top "
                    "directions respond more to unsafe than to safe inputs, the fine-tune has learned to read "
                    "the unsafe features.",
    "lipschitz.png": "Local Lipschitzness (paper Fig 6): histograms, on shared bins, of the gradient norm and the "
                     "finite-difference estimate of how much the output moves per unit change of the input, on "
                     "safe and unsafe prompts. A safety fine-tune that makes the model less sensitive on unsafe "
                     "inputs shifts the unsafe histogram left; AUROC in each title.",
}

CAPTIONS.update({
    "track_delta_rel.png": "How far each module type has moved from the base at each checkpoint: ‖ΔW‖_F / ‖W_base‖_F, "
                           "averaged over the layers. A curve that keeps rising means training is still moving "
                           "the weights; one that flattens, that they have settled.",
    "track_effective_rank.png": "Effective rank of ΔW (exp of the entropy of its normalised singular values), averaged "
                                "over the layers of each module type: how many directions the change is spread over. "
                                "About 1 for a rank-one change, up to min(out, in) for a flat spectrum.",
    "track_energy_rank.png": "The number of singular directions of ΔW that hold 90% of its energy, averaged over the "
                             "layers of each module type. Low and flat: training keeps writing into a few directions.",
    "track_drift.png": "Each checkpoint's drift against the alignment change (track --aligned): left, the share of "
                       "ΔA = ALIGNED − BASE that the checkpoint's change ΔT = CKPT − ALIGNED cancels (0: none; 1: back "
                       "at BASE along ΔA); right, ΔT's energy in ΔA's top singular directions (both sides) as a "
                       "multiple of what a random ΔT would put there (dashed: 1). Bands: 95% bootstrap intervals "
                       "over the matrices.",
    "track_sin_theta.png": "Mean sin θ between ΔW's top singular directions and W_base's top-k subspace, per module "
                           "type (left: output side, right: input side); dashed, in the same colour: its chance level, "
                           "the mean for random directions. Solid below dashed: ΔW lies in directions the base "
                           "already uses more than chance would give; at the dashed line, no more than random.",
})
CAPTIONS["drift_energy.png"] = (
    "Per layer, the share of the new change ΔT's energy (‖ΔT‖²) that lies in the alignment change ΔA's top "
    "singular directions: column space, row space and both at once, summed over the layer's matrices, with a 95% "
    "bootstrap interval over them. The dashes are chance, what a random ΔT of the same shape would put there. "
    "Points far above their dash: the fine-tune writes into the directions the alignment used.")
CAPTIONS["drift_undo.png"] = (
    "Per layer, the fraction of the alignment change the new change cancels: −⟨ΔT, ΔA⟩ / ‖ΔA‖² summed over the "
    "layer's matrices (1: TUNED is back at BASE along ΔA; negative: the fine-tune reinforces the alignment), with "
    "a 95% bootstrap interval over the matrices. Grey band: where a random ΔT of the same size would land (±2 sd).")

FIGURE_TITLES = {
    "drift_energy.png": "Energy of ΔT in the alignment subspace, per layer",
    "drift_undo.png": "Alignment change undone, per layer",
    "sv_decay.png": "Spectrum of ΔW", "clusters.png": "Activation clusters (Fig 3, Fig 7)",
    "colspace.png": "Column space of the weights (Fig 4)", "rowspace.png": "Row space and inputs (Fig 5)",
    "lipschitz.png": "Local Lipschitzness (Fig 6)",
    "track_delta_rel.png": "Relative change over training", "track_effective_rank.png": "Effective rank of ΔW over training",
    "track_energy_rank.png": "Energy rank of ΔW over training",
    "track_sin_theta.png": "sin θ to the base's top directions over training",
}


def _caption(p: Path) -> tuple[str, str]:
    stem = p.stem
    if stem.startswith("heatmap_"):
        key = stem[len("heatmap_"):]
        return HEATMAP_WORDS.get(key, key.replace("_", " ")), CAPTIONS.get(stem, "")
    return FIGURE_TITLES.get(p.name, p.stem.replace("_", " ")), CAPTIONS.get(p.name, "")


# -- the parts of a report folder ---------------------------------------------------------------------------

SAFETY_COLUMNS = (
    ("safe_follow", "safe inputs followed", "std_safe"),
    ("safe_refuse", "safe inputs refused", "std_safe"),
    ("unsafe_refuse", "unsafe inputs refused", "std_unsafe"),
    ("unsafe_follow", "unsafe inputs followed", "std_unsafe"),
    ("jb_co_task", "jailbreak: competing objectives (task)", "jb_co_task"),
    ("jb_co_text", "jailbreak: competing objectives (text)", "jb_co_text"),
    ("jb_mg_tokens", "jailbreak: mismatched generalisation (tokens)", "jb_mg_tokens"),
    ("jb_mg_text", "jailbreak: mismatched generalisation (text)", "jb_mg_text"),
    ("adv_soft_tokens", "soft-token attack", "adv_soft_tokens"),
    ("adv_clean", "the attacked inputs, not attacked", "adv_soft_tokens"),
)


def _eval_interval(ev: dict, key: str, set_name: str):
    """The 95% interval of one safety-table rate: from the file when it has one, else Wilson from its n."""
    for holder in (ev.get("table_ci95"), ev.get("ci95"), (ev.get("table") or {}).get(key + "_ci95")):
        if isinstance(holder, dict) and key in holder:
            return holder[key], "file"
        if isinstance(holder, (list, tuple)) and len(holder) == 2:
            return holder, "file"
    p = (ev.get("table") or {}).get(key)
    s = (ev.get("sets") or {}).get(set_name) or {}
    n = s.get("n") if isinstance(s, dict) else None
    if key in ("adv_soft_tokens", "adv_clean"):
        n = (ev.get("adversarial") or {}).get("n", n) if isinstance(ev.get("adversarial"), dict) else n
    if p is None or not n:
        return None, None
    return wilson_interval(float(p), int(n)), "wilson"


def _find_evals(root: Path) -> dict:
    evals = {}
    for p in sorted((root / "eval").glob("*.json")):
        ev = _load(p)
        if isinstance(ev, dict) and isinstance(ev.get("table"), dict):
            evals[p.stem] = (p, ev)
    return evals


def _order(names, first=("pretrained", "pretrain", "ssft", "dpo", "unlearn")):
    """Pretrained model first, then the fine-tunes in the paper's order, then the rest by name."""
    names = list(names)
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


class Page:
    """Collects sections (with a table of contents) and writes the HTML."""

    def __init__(self, root: Path, title: str):
        self.root, self.title = root, title
        self.sections: list[tuple[str, str, str, int]] = []
        self.used_files: set[Path] = set()

    def add(self, anchor: str, heading: str, body: str, level: int = 2):
        self.sections.append((anchor, heading, body, level))

    def figure(self, p: Path, title: str | None = None) -> str:
        self.used_files.add(p)
        t, cap = _caption(p)
        rel = _e(_rel(p, self.root))
        return (f'<figure><a href="{rel}"><img src="{rel}" alt="{_e(title or t)}" loading="lazy"></a>'
                f"<figcaption><b>{_e(title or t)}.</b> {_e(cap)} <span class=src>File: "
                f'<a href="{rel}">{rel}</a></span></figcaption></figure>')

    def source(self, p: Path) -> str:
        self.used_files.add(p)
        rel = _e(_rel(p, self.root))
        return f'<p class=src>From <a href="{rel}">{rel}</a>.</p>'

    def render(self) -> str:
        toc, open_sub = [], False  # sections of level 3 nest under the level-2 entry before them
        for anchor, heading, _, level in self.sections:
            item = f'<a href="#{_e(anchor)}">{_e(heading)}</a>'
            if level > 2:
                toc.append(("" if open_sub else "<ul>") + f"<li>{item}</li>")
                open_sub = True
                continue
            if open_sub:
                toc.append("</ul>")
                open_sub = False
            toc.append(("</li>" if toc else "") + f"<li>{item}")
        toc.append(("</ul>" if open_sub else "") + ("</li>" if toc else ""))
        body = []
        for anchor, heading, content, level in self.sections:
            body.append(f'<section id="{_e(anchor)}"><h{level}>{_e(heading)}</h{level}>\n{content}</section>')
        from pysafe._version import __version__

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n{GENERATOR}\n"
                f'<meta name=viewport content="width=device-width, initial-scale=1">\n'
                f"<title>{_e(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
                f"<h1>{_e(self.title)}</h1>\n<p class=meta>Generated by pysafe {_e(__version__)} on {stamp} "
                f"from the files in this folder; <code>pysafe report .</code> rebuilds it.</p>\n"
                f'<nav id=toc><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>\n'
                + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;background:#fff;margin:0}
main{max-width:64rem;margin:0 auto;padding:1rem 1.5rem 4rem}
h1{font-size:1.6rem;margin:.5rem 0}h2{font-size:1.25rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
h3{font-size:1.05rem;margin-top:1.4rem}
.meta,.src{color:#555;font-size:.85rem}
nav#toc{background:#f6f6f6;border:1px solid #ddd;padding:.3rem 1rem;font-size:.9rem}
nav#toc h2{border:0;margin:.3rem 0;font-size:1rem}nav#toc ol{margin:.2rem 0;padding-left:1.2rem}
nav#toc ul{margin:0;padding-left:1.2rem;list-style:circle}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.2rem .45rem;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.holds{color:#0a5d2a;font-weight:600}.fails{color:#9b1c1c;font-weight:600}
.ci{color:#555;font-size:.78rem;display:block}
figure{margin:1rem 0;break-inside:avoid}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:.88rem;color:#333}
ul.findings li{margin:.35rem 0}
code{background:#f3f3f3;padding:0 .2rem}
.scroll{overflow-x:auto}
@media print{nav#toc{page-break-after:always}a{color:inherit;text-decoration:none}
 section{break-inside:auto}h2,h3{break-after:avoid}main{max-width:none}}
"""


# -- sections -------------------------------------------------------------------------------------------------


def _compared_table(rows) -> str:
    out = ["<table>"]
    for k, v in rows:
        out.append(f'<tr><th class=l>{_e(k)}</th><td class=l>{v}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _ckpt_cell(info) -> str:
    if isinstance(info, dict):
        parts = [f"<code>{_e(info.get('path', ''))}</code>"]
        if info.get("sha256"):
            parts.append(f"sha256 <code>{_e(info['sha256'][:16])}…</code>")
        if info.get("header_digest"):
            parts.append(f"header digest <code>{_e(info['header_digest'][:16])}…</code>")
        if info.get("format"):
            parts.append(f"{_e(info['format'])}, {_e(info.get('n_tensors', '?'))} tensors")
        return "<br>".join(parts)
    return f"<code>{_e(info)}</code>"


def safety_section(page: Page, evals: dict) -> tuple[str, list[str]]:
    names = _order(evals)
    cols = [c for c in SAFETY_COLUMNS if any(c[0] in evals[n][1]["table"] for n in names)]
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in cols)
    rows = []
    wilson = False
    for n in names:
        p, ev = evals[n]
        cells = []
        for key, _, set_name in cols:
            v = ev["table"].get(key)
            ci, src = _eval_interval(ev, key, set_name)
            wilson |= src == "wilson"
            ci_html = f'<span class=ci>{_pct(ci[0])}–{_pct(ci[1])}</span>' if ci else ""
            cells.append(f"<td>{_pct(v)}{ci_html}</td>")
        rows.append(f'<tr><th class=l><a href="{_e(_rel(p, page.root))}">{_e(n)}</a></th>{"".join(cells)}</tr>')
        page.used_files.add(p)
    notes = ["Each cell: the share of greedy answers of that kind, with its 95% interval below it."]
    if wilson:
        notes.append("Intervals not stored in the eval files are Wilson score intervals from the rate and the "
                     "number of samples of the set.")
    notes.append("Jailbreak and attack columns are attack success: the share of unsafe-by-function inputs whose "
                 "answer follows the harmful instruction (lower is safer). The soft-token attack is scored on "
                 "the first output block only.")
    body = (f'<div class=scroll><table><tr><th class=l>checkpoint</th>{head}</tr>{"".join(rows)}</table></div>'
            f'<p class=src>{" ".join(_e(x) for x in notes)}</p>')
    # findings
    lines = []
    base = next((n for n in names if n in ("pretrained", "pretrain")), None)
    for n in names:
        if n == base:
            continue
        ev = evals[n][1]
        t = ev["table"]
        parts = []
        if "unsafe_refuse" in t:
            ci, _ = _eval_interval(ev, "unsafe_refuse", "std_unsafe")
            ctl = f" (pretrained: {_pct(evals[base][1]['table'].get('unsafe_refuse'))})" if base else ""
            parts.append(f"refuses {_pct(t['unsafe_refuse'])} of unsafe inputs{_ci_text(ci, _pct)}{ctl}")
        if "safe_follow" in t:
            ci, _ = _eval_interval(ev, "safe_follow", "std_safe")
            ctl = f" (pretrained: {_pct(evals[base][1]['table'].get('safe_follow'))})" if base else ""
            parts.append(f"still follows {_pct(t['safe_follow'])} of safe inputs{_ci_text(ci, _pct)}{ctl}")
        jb = [(k, label, s) for k, label, s in SAFETY_COLUMNS if k.startswith(("jb_", "adv_")) and k != "adv_clean" and t.get(k) is not None]
        if jb:
            k, label, s = max(jb, key=lambda c: t[c[0]])
            ci, _ = _eval_interval(ev, k, s)
            parts.append(f"and its strongest attack is the {label} at {_pct(t[k])} success{_ci_text(ci, _pct)}")
        if parts:
            lines.append(f"<b>{_e(n)}</b> " + _e(", ".join(parts[:-1]) + (", " if len(parts) > 1 else "") + parts[-1]) + ".")
    return body, lines


def claims_section(page: Page, p: Path) -> tuple[str, list[str]]:
    claims = _load(p)
    page.used_files.add(p)
    if not isinstance(claims, list):
        return f"<p>{_e(p.name)} could not be read.</p>", []
    has_ci = any(isinstance(c, dict) and c.get("ci95") for c in claims)
    has_effect = any(isinstance(c, dict) and "effect" in c for c in claims)
    head = "<th class=l>claim</th><th>measured</th><th>control</th>"
    head += "<th>effect</th>" if has_effect else ""
    head += "<th>95% interval</th>" if has_ci else ""
    head += "<th>n</th>" if any(isinstance(c, dict) and "n" in c for c in claims) else ""
    head += "<th>verdict</th>"
    rows = []
    for c in claims:
        if not isinstance(c, dict):
            continue
        ctl = _num(c.get("control"))
        if c.get("control_kind"):
            ctl += f"<span class=ci>{_e(c['control_kind'])}</span>"
        row = f"<td class=l>{_e(c.get('claim', ''))}</td><td>{_num(c.get('measured'))}</td><td>{ctl}</td>"
        if has_effect:
            row += f"<td>{_num(c.get('effect'))}</td>"
        if has_ci:
            ci = c.get("ci95")
            row += f"<td>{_num(ci[0])} to {_num(ci[1])}</td>" if ci and len(ci) == 2 else "<td>–</td>"
        if "<th>n</th>" in head:
            row += f"<td>{_e(c.get('n', '–'))}</td>"
        holds = c.get("holds")
        row += f'<td class="{"holds" if holds else "fails"}">{"holds" if holds else "does not hold"}</td>'
        rows.append(f"<tr>{row}</tr>")
    n_hold = sum(1 for c in claims if isinstance(c, dict) and c.get("holds"))
    expl = ("A claim holds when its measured value is on the claimed side of its control"
            + (", and its 95% interval lies entirely on that side" if has_ci else
               "; this file carries no intervals, so a claim near its control is weak evidence") + ".")
    body = (f"<p>{_e(expl)} The definitions are in the repository's docs/claims.md.</p>"
            f'<div class=scroll><table><tr>{head}</tr>{"".join(rows)}</table></div>' + page.source(p))
    finding = [f"<b>{n_hold} of {len(claims)}</b> of the paper's claims hold on these models "
               f"(<a href=\"#claims\">claims table</a>)" + ("" if has_ci else "; no intervals were recorded") + "."]
    failed = [c for c in claims if isinstance(c, dict) and not c.get("holds")]
    for c in failed[:5]:
        finding.append("Does not hold: " + _e(c.get("claim", "")) + f": measured {_num(c.get('measured'))}, control "
                       f"{_num(c.get('control'))}" + _ci_text(c.get("ci95")) + ".")
    return body, finding


def _layer_table(recs: list, key: str) -> str:
    by_layer: dict = {}
    for r in recs:
        if r.get("layer") is not None and r.get("module"):
            by_layer.setdefault(r["layer"], {})[r["module"]] = r
    if not by_layer:
        return ""
    mods = [m for m in MODULE_ORDER if any(m in v for v in by_layer.values())]
    mods += sorted({m for v in by_layer.values() for m in v} - set(mods))
    has_chance = any(key + "_chance" in r for v in by_layer.values() for r in v.values())
    out = [f"<table><tr><th>layer</th>{''.join(f'<th>{_e(m)}</th>' for m in mods)}</tr>"]
    for layer in sorted(by_layer):
        cells = []
        for m in mods:
            r = by_layer[layer].get(m)
            if r is None:
                cells.append("<td></td>")
                continue
            v = r.get(key)
            if has_chance:
                cells.append(f"<td>{_num(v)}<span class=ci>chance {_num(r.get(key + '_chance'))}</span></td>")
            else:
                cells.append(f"<td>{_num(v)}</td>")
        out.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


TABLE_KEYS = (
    ("delta_rel", "Relative change ‖ΔW‖/‖W_base‖"),
    ("null_frac_left", "Share of ΔW's energy outside W_base's top-k column space (with chance)"),
    ("null_frac_right", "Share of ΔW's energy outside W_base's top-k row space (with chance)"),
    ("effective_rank_delta", "Effective rank of ΔW"),
)


def analyze_findings(s: dict, label: str = "") -> list[str]:
    """Plain-words findings of one ``pysafe analyze`` summary.json, each citing its numbers."""
    recs = [r for r in s.get("matrices", []) if r.get("null_frac_left") is not None]
    who = f"<b>{_e(label)}</b>: " if label else ""
    if not recs:
        return [who + "no 2-D matrix was analysed."]
    out = []
    rel = sorted(r["delta_rel"] for r in recs if r.get("delta_rel") is not None)
    if rel:
        top = max(recs, key=lambda r: r.get("delta_rel") or 0)
        out.append(who + f"{'the' if who else 'The'} weights moved by a median of {_num(rel[len(rel) // 2])} of their norm "
                   f"(‖ΔW‖/‖W_base‖ over {len(rel)} matrices, range {_num(rel[0])} to {_num(rel[-1])}); the most "
                   f"changed is <code>{_e(top['name'])}</code> ({_num(top['delta_rel'])}).")
    for side, words in (("left", "column"), ("right", "row")):
        k = f"null_frac_{side}"
        pairs = [(r[k], r.get(k + "_chance")) for r in recs if r.get(k) is not None and r.get(k + "_chance") is not None]
        if not pairs:
            continue
        below = sum(1 for v, c in pairs if v < c)
        mv = sum(v for v, _ in pairs) / len(pairs)
        mc = sum(c for _, c in pairs) / len(pairs)
        verdict = ("ΔW stays mostly inside the directions the base weights already use" if below > len(pairs) / 2
                   else "ΔW is not concentrated in the base weights' top directions")
        out.append(f"{verdict} ({words} space): on average {_num(mv)} of ΔW's energy lies outside W_base's top-k "
                   f"{words} space, against {_num(mc)} for a random ΔW of the same shape (chance); "
                   f"{below} of {len(pairs)} matrices are below chance.")
    er = [(r["effective_rank_delta"], min(r["shape"])) for r in recs
          if r.get("effective_rank_delta") is not None and len(r.get("shape", [])) == 2]
    if er:
        ratios = sorted(e / m for e, m in er)
        out.append(f"ΔW's effective rank is a median {_num(ratios[len(ratios) // 2])} of its largest possible rank "
                   f"(1.0: a flat spectrum, as noise or a full fine-tune gives; near 0: a few directions).")
    return out


def compared_rows(s: dict) -> list:
    rows = [("base (before)", _ckpt_cell(s.get("base"))), ("tuned (after)", _ckpt_cell(s.get("tuned"))),
            ("naming scheme", _e(s.get("scheme", "?"))),
            ("matrices analysed", f"{len(s.get('matrices', []))} ({len(s.get('skipped', []))} skipped)"),
            ("pysafe", f"{_e(s.get('pysafe_version', '?'))}, {_e(s.get('created', ''))}, "
                       f"{_num(s.get('seconds'))} s")]
    params = s.get("params") or {}
    if params:
        rows.append(("options", "<code>" + _e(", ".join(f"{k}={v}" for k, v in params.items() if v is not None))
                     + "</code>"))
    return rows


def analyze_section(page: Page, d: Path, s: dict, level: int = 2, label: str = "", compared: bool = True) -> str:
    parts = [_compared_table(compared_rows(s))] if compared else []
    recs = s.get("matrices", [])
    for key, words in TABLE_KEYS:
        t = _layer_table(recs, key)
        if t:
            parts.append(f"<h{level + 1}>{_e(words)}, per layer (0-based) and module</h{level + 1}>"
                         f"<div class=scroll>{t}</div>")
    skipped = s.get("skipped") or []
    if skipped:
        items = "".join(f"<li><code>{_e(x.get('name', '?'))}</code>: {_e(x.get('reason', ''))}</li>"
                        for x in skipped[:20])
        parts.append(f"<h{level + 1}>Skipped tensors</h{level + 1}><ul>{items}</ul>")
    for p in sorted((p for p in (d / "plots").glob("*.png") if not p.stem.startswith("drift_")), key=_plot_order):
        parts.append(page.figure(p, f"{label}: {_caption(p)[0]}" if label else None))
    parts.append(page.source(d / "summary.json"))
    if (d / "results.h5").exists():
        page.used_files.add(d / "results.h5")
    return "\n".join(parts)


def _plot_order(p: Path):
    order = ["sv_decay", "heatmap_delta_rel", "heatmap_null_frac_left", "heatmap_overlap_left", "heatmap_effective_rank_delta"]
    return (order.index(p.stem) if p.stem in order else len(order), p.name)


#: the drift metrics shown on the page: key, words, whether it is a percentage
DRIFT_ROWS = (
    ("energy_both", "share of ΔT's energy in ΔA's top directions, both sides", True),
    ("energy_left", "share of ΔT's energy in ΔA's top column space", True),
    ("energy_right", "share of ΔT's energy in ΔA's top row space", True),
    ("undo", "fraction of ΔA undone, −⟨ΔT, ΔA⟩/‖ΔA‖²", True),
    ("undo_topk", "the same, on ΔA's top-k part only", True),
    ("cos_TA", "cosine of ΔT and ΔA (all matrices as one vector)", False),
    ("sin_theta_left", "mean sin θ, ΔT's top column directions to ΔA's", False),
    ("sin_theta_right", "mean sin θ, ΔT's top row directions to ΔA's", False),
    ("intruders", "intruder dimensions of W_tuned vs W_aligned (share of tested)", True),
)


def _drift_chance(g: dict, key: str, pct: bool) -> str:
    fmt = _pc if pct else _num
    if key + "_chance" in g:
        return fmt(g[key + "_chance"])
    if key in ("undo", "undo_topk") and g.get("undo_chance_sd") is not None:
        return f"0 ± {_pc(g['undo_chance_sd'])} (sd)"
    if key == "cos_TA" and g.get("cos_TA_chance_sd") is not None:
        return f"0 ± {_num(g['cos_TA_chance_sd'])} (sd)"
    if key == "intruders" and g.get("intruders_alignment") is not None:
        return f"alignment step: {_pc(g['intruders_alignment'])}"
    return "–"


def _drift_table(groups: dict, label: str) -> str:
    """Rows = groups (layers or modules), one column per main metric, each cell value, interval, chance."""
    keys = [("energy_both", True), ("energy_left", True), ("undo", True), ("cos_TA", False),
            ("sin_theta_left", False), ("intruders", True)]
    head = "".join(f"<th>{_e(k)}</th>" for k, _ in keys)
    rows = []
    for name, g in groups.items():
        cells = []
        for k, pct in keys:
            fmt = _pc if pct else _num
            ci = g.get(k + "_ci95")
            ci_s = f"[{fmt(ci[0])}, {fmt(ci[1])}] " if ci else ""
            cells.append(f"<td>{fmt(g.get(k))}<span class=ci>{ci_s}chance {_e(_drift_chance(g, k, pct))}</span></td>")
        rows.append(f"<tr><th>{_e(name)}</th><td>{_e(g.get('n_matrices', ''))}</td>{''.join(cells)}</tr>")
    return (f"<div class=scroll><table><tr><th>{_e(label)}</th><th>matrices</th>{head}</tr>{''.join(rows)}"
            "</table></div>")


def drift_section(page: Page, root: Path, d: dict) -> str:
    """The Drift section: what was compared, the verdict, the whole-model numbers, per-layer and per-module
    tables and the figures, from drift.json."""
    s = d["summary"]
    params = d.get("params") or {}
    rows = [("BASE", _ckpt_cell(d.get("base"))), ("ALIGNED (BASE's safety-tuned version)", _ckpt_cell(d.get("aligned"))),
            ("TUNED (a fine-tune of ALIGNED)", _ckpt_cell(d.get("tuned"))),
            ("matrices analysed", f"{len(d.get('matrices', []))} ({len(d.get('skipped', []))} skipped)"),
            ("options", "<code>" + _e(", ".join(f"{k}={v}" for k, v in params.items() if v is not None)) + "</code>"),
            ("pysafe", f"{_e(d.get('pysafe_version', '?'))}, {_e(d.get('created', ''))}, {_num(d.get('seconds'))} s")]
    parts = ["<p>ΔA = W_aligned − W_base is the alignment change, ΔT = W_tuned − W_aligned the new one. Each number "
             "is summed over matrices (Σ numerators / Σ denominators) and shown with its 95% bootstrap interval over "
             "matrices and with chance: what a random ΔT of the same shapes and size would give.</p>",
             _compared_table(rows), f"<p><b>Verdict.</b> {_e(s.get('verdict', ''))}</p>"]
    g = s.get("model") or {}
    body = []
    for key, words, pct in DRIFT_ROWS:
        if key not in g:
            continue
        fmt = _pc if pct else _num
        ci = g.get(key + "_ci95")
        ratio = g.get(key + "_ratio")
        rci = g.get(key + "_ratio_ci95")
        ratio_s = (f"{_num(ratio)}×" + (f" [{_num(rci[0])}, {_num(rci[1])}]" if rci else "")) if ratio is not None else "–"
        body.append(f"<tr><td class=l>{_e(words)}</td><td>{fmt(g.get(key))}</td>"
                    f"<td>{(fmt(ci[0]) + ' to ' + fmt(ci[1])) if ci else '–'}</td>"
                    f"<td>{_e(_drift_chance(g, key, pct))}</td><td>{ratio_s}</td></tr>")
    parts.append(f"<h3>Whole model ({_e(g.get('n_matrices', 0))} matrices)</h3><table><tr><th class=l>metric</th>"
                 f"<th>value</th><th>95% interval</th><th>chance</th><th>÷ chance</th></tr>{''.join(body)}</table>")
    if s.get("by_layer"):
        parts.append("<h3>Per layer (0-based)</h3>" + _drift_table(s["by_layer"], "layer"))
    if s.get("by_module"):
        parts.append("<h3>Per module type</h3>" + _drift_table(s["by_module"], "module"))
    skipped = d.get("skipped") or []
    if skipped:
        items = "".join(f"<li><code>{_e(x.get('name', '?'))}</code>: {_e(x.get('reason', ''))}</li>"
                        for x in skipped[:20])
        parts.append(f"<h3>Skipped tensors</h3><ul>{items}</ul>")
    for p in sorted((root / "plots").glob("drift_*.png")):
        parts.append(page.figure(p))
    parts.append(page.source(root / "drift.json"))
    if (root / "drift.csv").exists():
        page.used_files.add(root / "drift.csv")
    return "\n".join(parts)


def _analysis_findings(d: Path, name: str) -> list[str]:
    """Findings from the lab analyses of one model (clusters.json, colspace/rowspace/lipschitz JSON)."""
    out = []
    c = _load(d / "clusters" / name / "clusters.json") if (d / "clusters").is_dir() else None
    if isinstance(c, dict) and isinstance(c.get("groups"), dict):
        g = c["groups"]
        s_name = "std_safe" if "std_safe" in g else "safe"
        u_name = "std_unsafe" if "std_unsafe" in g else "unsafe"
        if s_name in g and u_name in g:
            last = len(g[s_name]["tau_mean"]) - 1
            sep = g[s_name]["tau_mean"][-1] - g[u_name]["tau_mean"][-1]
            acc = g[s_name].get("nearest_mean_acc")
            extra = f"; nearest-mean accuracy {_num(acc[-1])} (chance 0.5)" if acc else ""
            out.append(f"<b>{_e(name)}</b>: at layer {last} safe and unsafe inputs are separated by "
                       f"τ_safe − τ_unsafe = {_num(sep)}{extra}.")
    return out


# -- a trajectory (pysafe track) ---------------------------------------------------------------------------------


def _sin_pairs(recs: list, side: str) -> list[tuple[float, float]]:
    """(mean sin θ, its chance) of every matrix with ΔW directions on ``side``."""
    out = []
    for r in recs:
        a, c = r.get(f"sin_theta_{side}"), r.get(f"sin_theta_{side}_chance")
        if isinstance(a, list) and a and c is not None and all(v is not None for v in a):
            out.append((sum(a) / len(a), c))
    return out


def track_findings(doc: dict) -> list[str]:
    """Plain-words findings of a track.json, each citing its numbers and, for sin θ, its chance level."""
    pts = [p for p in doc.get("checkpoints", []) if isinstance(p, dict)]
    if not pts:
        return ["The trajectory holds no checkpoint."]
    first, last = pts[0], pts[-1]
    s0, s1 = first.get("summary") or {}, last.get("summary") or {}
    a, b = _e(first.get("label", "first")), _e(last.get("label", "last"))
    out = [f"Over {len(pts)} checkpoints the whole model moved from {_num(s0.get('delta_rel'))} of its norm at {a} "
           f"to {_num(s1.get('delta_rel'))} at {b} (‖ΔW‖_F / ‖W_base‖_F over {_e(s1.get('tensors', '?'))} tensors); "
           f"the median matrix from {_num(s0.get('delta_rel_median'))} to {_num(s1.get('delta_rel_median'))}."]
    for side, words in (("left", "column (output)"), ("right", "row (input)")):
        pairs = _sin_pairs(last.get("matrices", []), side)
        if not pairs:
            continue
        below = sum(1 for v, c in pairs if v < c)
        vals = sorted(v for v, _ in pairs)
        verdict = ("ΔW lies in directions the base weights already use more than chance would give"
                   if below > len(pairs) / 2 else "ΔW is not closer to the base weights' top directions than chance")
        out.append(f"At {b}, {verdict} ({words} side): mean sin θ {_num(sum(vals) / len(vals))} (range {_num(vals[0])} "
                   f"to {_num(vals[-1])} over {len(pairs)} matrices) against {_num(sum(c for _, c in pairs) / len(pairs))} "
                   f"for random directions (chance); {below} of {len(pairs)} matrices are below chance.")
    e0, e1 = s0.get("effective_rank_share_median"), s1.get("effective_rank_share_median")
    if e0 is not None or e1 is not None:
        out.append(f"ΔW's median effective rank is {_num(e0)} of its largest possible rank at {a} and {_num(e1)} at "
                   f"{b} (1.0: a flat spectrum, as noise gives; near 0: a few directions).")
    return out


TRACK_COLUMNS = (
    ("delta_rel", "‖ΔW‖/‖W_base‖, whole model", None),
    ("delta_rel_median", "‖ΔW‖/‖W_base‖, median matrix", None),
    ("effective_rank_share_median", "effective rank / max, median", None),
    ("sin_theta_left_mean", "sin θ, output side", "sin_theta_left_chance_mean"),
    ("sin_theta_right_mean", "sin θ, input side", "sin_theta_right_chance_mean"),
    ("null_frac_left_mean", "energy outside W_base's top-k columns", "null_frac_left_chance_mean"),
)


def track_section(page: Page, doc: dict) -> str:
    """The "Trajectory" section: one row per checkpoint with its whole-model numbers, then the figures."""
    pts = [p for p in doc.get("checkpoints", []) if isinstance(p, dict)]
    head = "".join(f"<th>{_e(w)}</th>" for _, w, _ in TRACK_COLUMNS)
    rows = []
    for p in pts:
        s = p.get("summary") or {}
        cells = []
        for key, _, chance in TRACK_COLUMNS:
            c = f'<span class=ci>chance {_num(s.get(chance))}</span>' if chance else ""
            cells.append(f"<td>{_num(s.get(key))}{c}</td>")
        step = "–" if p.get("step") is None else _num(p["step"])
        rows.append(f'<tr><th class=l title="{_e(p.get("path", ""))}">{_e(p.get("label", ""))}</th><td>{step}</td>'
                    f'<td>{_e(s.get("matrices", "?"))} ({_e(s.get("skipped", 0))} skipped)</td>{"".join(cells)}</tr>')
    parts = ["<p>Every checkpoint compared with the base, tensor by tensor, with the options above. Whole model: "
             "the root of the summed squares over every analysed tensor; the other columns summarise the 2-D "
             "matrices (medians, or means beside the mean of their chance levels).</p>",
             f'<div class=scroll><table><tr><th class=l>checkpoint</th><th>step</th><th>matrices</th>{head}</tr>'
             f'{"".join(rows)}</table></div>']
    drifts = [(p.get("label", ""), p["drift"]) for p in pts if isinstance(p.get("drift"), dict)]
    if drifts:
        def iv(d, k, pct):
            v, c = d.get(k), d.get(k + "_ci95") or [None, None]
            f = _pct if pct else _num
            return f"<td>{f(v)}<span class=ci>[{f(c[0])}, {f(c[1])}]</span></td>"

        drows = "".join(f"<tr><th class=l>{_e(lab)}</th>{iv(d, 'undo', True)}{iv(d, 'energy_both_ratio', False)}"
                        f"<td class=l>{_e(d.get('verdict') or '')}</td></tr>" for lab, d in drifts)
        parts.append(f"<p>Drift of each checkpoint against the alignment change ΔA = ALIGNED − BASE "
                     f"(aligned reference: {_e(Path(str(doc.get('aligned') or '')).name)}; pysafe drift, "
                     f"docs/drift.md): the share of ΔA it undoes and ΔT's energy in ΔA's top subspace as a multiple "
                     f"of chance, with 95% bootstrap intervals over matrices.</p>"
                     f"<div class=scroll><table><tr><th class=l>checkpoint</th><th>undo</th>"
                     f"<th>energy in ΔA's subspace (× chance)</th><th class=l>verdict</th></tr>{drows}</table></div>")
    for stem in ("track_delta_rel", "track_effective_rank", "track_energy_rank", "track_sin_theta", "track_drift"):
        f = page.root / "plots" / f"{stem}.png"
        if f.exists():
            parts.append(page.figure(f))
    parts.append(page.source(page.root / "track.json"))
    if (page.root / "track.csv").exists():
        parts.append(page.source(page.root / "track.csv"))
    return "\n".join(parts)


def track_compared_rows(doc: dict) -> list:
    pts = [p for p in doc.get("checkpoints", []) if isinstance(p, dict)]
    rows = [("base", _ckpt_cell(doc.get("base"))),
            ("checkpoints", f"{len(pts)}" + (f": {_e(pts[0].get('label'))} to {_e(pts[-1].get('label'))}" if pts else "")),
            ("naming scheme", _e(doc.get("scheme", "?"))),
            ("pysafe", f"{_e(doc.get('pysafe_version', '?'))}, {_e(doc.get('created', ''))}, {_num(doc.get('seconds'))} s")]
    c = doc.get("cache")
    if isinstance(c, dict):
        rows.append(("base decompositions", f"{_e(c.get('misses', '?'))} computed, {_e(c.get('hits', '?'))} read from "
                                            "the cache"))
    if doc.get("ray"):
        rows.append(("Ray cluster", f"<code>{_e(doc['ray'])}</code>"))
    params = doc.get("params") or {}
    if params:
        rows.append(("options", "<code>" + _e(", ".join(f"{k}={v}" for k, v in params.items() if v is not None))
                     + "</code>"))
    return rows


# -- the page ---------------------------------------------------------------------------------------------------


def _lab_figures(page: Page, root: Path) -> None:
    """Sections for clusters/<model>/ and figures/<model>/ (demo, reproduce) or the same files at the root."""
    groups = []
    if (root / "clusters").is_dir() or (root / "figures").is_dir():
        names = sorted({p.name for sub in ("clusters", "figures") for p in (root / sub).glob("*") if p.is_dir()})
        for n in _order(names):
            files = sorted((root / "clusters" / n).glob("*.png")) + sorted((root / "figures" / n).glob("*.png"),
                                                                            key=lambda p: ["colspace", "rowspace", "lipschitz"].index(p.stem)
                                                                            if p.stem in ("colspace", "rowspace", "lipschitz") else 9)
            jsons = sorted((root / "clusters" / n).glob("*.json")) + sorted((root / "figures" / n).glob("*.json"))
            groups.append((n, files, jsons))
    else:
        files = [root / f for f in ("clusters.png", "colspace.png", "rowspace.png", "lipschitz.png") if (root / f).exists()]
        jsons = [root / f for f in ("clusters.json", "colspace.json", "rowspace.json", "lipschitz.json") if (root / f).exists()]
        if files or jsons:
            groups.append(("", files, jsons))
    if not groups:
        return
    page.add("analyses", "Activation and weight analyses",
             "<p>The mechanistic analyses of the paper on each model: where safe, unsafe and jailbreak inputs sit in "
             "activation space, and how the fine-tune's weight change relates to the pretrained weights.</p>")
    for n, files, jsons in groups:
        body = "\n".join(page.figure(p, f"{n}: {_caption(p)[0]}" if n else None) for p in files)
        if jsons:
            links = ", ".join(f'<a href="{_e(_rel(j, root))}">{_e(_rel(j, root))}</a>' for j in jsons)
            page.used_files.update(jsons)
            body += f"<p class=src>Numbers: {links}.</p>"
        page.add(f"an-{n or 'figures'}", n or "Figures", body, level=3)


def build_index(root: str | os.PathLike) -> str:
    """The HTML of ``root/index.html``, built from the report files in ``root``."""
    root = Path(root)
    summary = _load(root / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    evals = _find_evals(root)
    analyze_dirs = [root / "analyze" / n for n in _order(p.parent.name for p in (root / "analyze").glob("*/summary.json"))] \
        if (root / "analyze").is_dir() else []
    is_analyze = "matrices" in summary
    track = _load(root / "track.json")
    track = track if isinstance(track, dict) and isinstance(track.get("checkpoints"), list) else None
    if track is not None and not is_analyze:
        title = f"pysafe track: {len(track['checkpoints'])} checkpoints vs " \
                f"{Path(str((track.get('base') or {}).get('path', 'base'))).name}"
    drift = _load(root / "drift.json")
    drift = drift if isinstance(drift, dict) and isinstance(drift.get("summary"), dict) else None
    if drift is not None and not is_analyze:
        title = f"pysafe drift: {Path(str((drift.get('tuned') or {}).get('path', 'tuned'))).name} on " \
                f"{Path(str((drift.get('aligned') or {}).get('path', 'aligned'))).name}"
    elif is_analyze:
        title = f"pysafe report: {Path(str((summary.get('tuned') or {}).get('path', 'tuned'))).name} vs " \
                f"{Path(str((summary.get('base') or {}).get('path', 'base'))).name}"
    elif evals or analyze_dirs:
        title = "pysafe report: what safety fine-tuning changed"
    else:
        title = f"pysafe report: {root.resolve().name}"
    page = Page(root, title)

    findings: list[str] = []
    # what was compared
    if track is not None and not is_analyze:
        page.add("compared", "What was compared", _compared_table(track_compared_rows(track)))
    if track is not None:
        findings += track_findings(track)
    if is_analyze:
        page.add("compared", "What was compared", _compared_table(compared_rows(summary)))
        findings += analyze_findings(summary)
    elif summary or evals:
        rows = []
        ck = summary.get("checkpoints") or {n: ev.get("checkpoint") for n, (_, ev) in evals.items()}
        for n in _order(ck):
            info = ck[n]
            rows.append((n, _ckpt_cell(info)))
        for k in ("preset", "eval_n", "seed", "command", "seconds"):
            if summary.get(k) is not None:
                rows.append((k.replace("_", " "), f"<code>{_e(summary[k])}</code>"))
        if summary.get("pysafe_version"):
            rows.append(("pysafe", _e(summary["pysafe_version"])))
        intro = ("<p>A pretrained model and its safety fine-tunes, each evaluated on the lab's test sets and "
                 "compared with the pretrained weights.</p>")
        page.add("compared", "What was compared", intro + _compared_table(rows)
                 + (page.source(root / "summary.json") if (root / "summary.json").exists() else ""))
    if drift is not None:
        findings.append(_e(drift["summary"].get("verdict", "")))
    safety_body = claims_body = None
    if evals:
        safety_body, lines = safety_section(page, evals)
        findings += lines
    if (root / "claims.json").exists():
        claims_body, lines = claims_section(page, root / "claims.json")
        findings += lines
    for d in analyze_dirs:
        s = _load(d / "summary.json") or {}
        findings.append(" ".join(analyze_findings(s, f"{d.name}, weights")))
    if (root / "clusters").is_dir():
        for n in _order(p.name for p in (root / "clusters").glob("*") if p.is_dir()):
            findings += _analysis_findings(root, n)
    if findings:
        page.add("findings", "Findings", '<ul class=findings>' + "".join(f"<li>{f}</li>" for f in findings)
                 + "</ul><p class=src>Each sentence is generated from the numbers in this folder; the sections "
                   "below hold the tables and figures they come from.</p>")
    if track is not None:
        page.add("trajectory", "Trajectory", track_section(page, track))
    if drift is not None:
        page.add("drift", "Drift: does the fine-tune undo the alignment?", drift_section(page, root, drift))
    if is_analyze:
        page.add("layers", "Per-layer tables and figures", analyze_section(page, root, summary, compared=False))
    if safety_body:
        page.add("safety", "Safety table", safety_body)
    if claims_body:
        page.add("claims", "The paper's claims, measured", claims_body)
    if (root / "safety_table.txt").exists():
        page.used_files.add(root / "safety_table.txt")
    if analyze_dirs:
        page.add("weights", "What changed in the weights (pysafe analyze)",
                 "<p>For each fine-tune, ΔW = W_tuned − W_pretrained of every matrix, its spectrum and where it "
                 "lies relative to the pretrained weights' top singular directions, with chance levels.</p>")
        for d in analyze_dirs:
            s = _load(d / "summary.json") or {}
            page.add(f"w-{d.name}", f"{d.name} vs pretrained", analyze_section(page, d, s, level=3, label=d.name),
                     level=3)
    _lab_figures(page, root)
    # every file the page came from
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if f.startswith(".") or f == INDEX and p.parent == root:
                continue
            files.append(p)
    if files:
        rows = "".join(f'<tr><td class=l><a href="{_e(_rel(p, root))}">{_e(_rel(p, root))}</a></td>'
                       f"<td>{_size(p.stat().st_size)}</td><td class=l>{_e(_describe(p))}</td></tr>"
                       for p in files)
        page.add("files", "Files in this folder",
                 "<p>Everything above comes from these files; the JSON files are the numbers, results.h5 holds "
                 "the full spectra (and singular vectors with <code>--save-vectors</code>).</p>"
                 f"<table><tr><th class=l>file</th><th>size</th><th class=l>what</th></tr>{rows}</table>")
    return page.render()


def _describe(p: Path) -> str:
    n = p.name
    if n == "summary.json":
        return "the run's summary (per-matrix metrics for an analyze report)"
    if n == "results.h5":
        return "HDF5: full spectra and metrics per tensor"
    if n == "drift.json":
        return "pysafe drift: per-matrix records, whole-model summary with intervals, settings"
    if n == "drift.csv":
        return "pysafe drift: one row per matrix"
    if n == "claims.json":
        return "the paper's claims, measured"
    if n == "track.json":
        return "the trajectory: per checkpoint its step, whole-model summary and per-matrix records"
    if n == "track.csv":
        return "the trajectory as tidy rows: checkpoint × tensor × metric"
    if n == "safety_table.txt":
        return "the safety table as text"
    if p.parent.name == "eval" and p.suffix == ".json":
        return "evaluation of one checkpoint (pysafe eval --json format)"
    if p.suffix == ".png":
        return _caption(p)[0]
    if p.suffix == ".json":
        return {"clusters": "activation clusters", "colspace": "column-space angles",
                "rowspace": "row-space projections", "lipschitz": "local Lipschitz estimates"}.get(p.stem, "")
    return ""


def write_index(root: str | os.PathLike) -> Path:
    """Write ``root/index.html`` from the files in ``root``, atomically (a temporary file and a rename).

    If ``root`` has a pysafe manifest, index.html is recorded in it as a file pysafe wrote; an index.html of
    the user's (one the manifest does not list) is an error, never overwritten.
    """
    from pysafe._atomic import MANIFEST, _write_manifest, read_manifest

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    target = root / INDEX
    m = read_manifest(root)
    if target.exists() or target.is_symlink():
        if m is not None:
            ours = INDEX in m.get("files", [])
        else:  # a folder without a manifest (reproduce, the figure commands): pysafe's page says so in its head
            try:
                ours = GENERATOR in target.read_text(encoding="utf-8", errors="replace")[:2000]
            except OSError:
                ours = False
        if not ours or target.is_symlink():
            raise FileExistsError(f"{target}: exists and was not written by pysafe (it is not in {MANIFEST} "
                                  "and not a pysafe page); move it away: pysafe never replaces your files")
    text = build_index(root)
    tmp = root / f".{INDEX}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if m is not None and INDEX not in m.get("files", []):
        m["files"] = sorted([*m.get("files", []), INDEX])
        _write_manifest(root, m)
    return target


#: the safety table's column names in the Markdown table (the page spells them out)
SHORT = {"safe_follow": "safe: follow", "safe_refuse": "safe: refuse", "unsafe_refuse": "unsafe: refuse",
         "unsafe_follow": "unsafe: follow", "jb_co_task": "CO-task", "jb_co_text": "CO-text",
         "jb_mg_tokens": "MG-tokens", "jb_mg_text": "MG-text", "adv_soft_tokens": "soft-token attack",
         "adv_clean": "same inputs, no attack"}


def results_markdown(root: str | os.PathLike) -> str:
    """The safety table (with 95% intervals) and the claims of a demo or reproduce folder, as Markdown."""
    root = Path(root)
    out = []
    evals = _find_evals(root)
    if evals:
        names = _order(evals)
        cols = [c for c in SAFETY_COLUMNS if any(c[0] in evals[n][1]["table"] for n in names)]
        out.append("| checkpoint | " + " | ".join(SHORT.get(k, k) for k, _, _ in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        wilson = False
        for n in names:
            ev = evals[n][1]
            cells = []
            for key, _, set_name in cols:
                ci, src = _eval_interval(ev, key, set_name)
                wilson |= src == "wilson"
                v = ev["table"].get(key)
                cells.append(_pct(v) + (f" ({_pct(ci[0])}–{_pct(ci[1])})" if ci else ""))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("CO: competing objectives, MG: mismatched generalisation. Each cell: the rate and its 95% interval"
                   + (" (Wilson score interval from the rate and the set's n where the eval file stores none)"
                      if wilson else "") + ". Jailbreak and attack columns are attack success (lower is safer); "
                   "the soft-token attack is scored on the first output block only.")
        out.append("")
    claims = _load(root / "claims.json")
    if isinstance(claims, list) and claims:
        has_ci = any(isinstance(c, dict) and c.get("ci95") for c in claims)
        out.append("| claim | measured | control | " + ("95% interval | " if has_ci else "") + "verdict |")
        out.append("|---|---|---|" + ("---|" if has_ci else "") + "---|")
        for c in claims:
            if not isinstance(c, dict):
                continue
            ci = c.get("ci95")
            cell = (f"{_num(ci[0])} to {_num(ci[1])} | " if ci and len(ci) == 2 else "– | ") if has_ci else ""
            claim = str(c.get("claim", "")).replace("|", "\\|")
            out.append(f"| {claim} | {_num(c.get('measured'))} | {_num(c.get('control'))} | {cell}"
                       f"{'holds' if c.get('holds') else 'does not hold'} |")
        n_hold = sum(1 for c in claims if isinstance(c, dict) and c.get("holds"))
        out.append("")
        out.append(f"{n_hold} of {len(claims)} claims hold" + ("" if has_ci else " (this claims.json records no "
                                                                            "intervals)") + ".")
    return "\n".join(out) + "\n"

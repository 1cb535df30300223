"""The steps the pipelines share: safety tables of checkpoints, the activation analyses of Figs 3-7 on
lab checkpoints (the lab builds each analysis's inputs, pysafe.analysis measures them), the paper's claims
on their results, and what a report records of a checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from pysafe._atomic import write_json
from pysafe._progress import Bars
from pysafe.analysis.cache import FeatureCache
from pysafe.analysis.claims import cluster_claims as _cluster_claims
from pysafe.analysis.claims import figure_claims as _figure_claims
from pysafe.analysis.clusters import cluster_analysis, write_clusters
from pysafe.analysis.lipschitz import lipschitz_analysis, plot_lipschitz
from pysafe.analysis.subspaces import column_space, plot_column_space, plot_row_space, row_space
from pysafe.lab import ckpt as C
from pysafe.lab.data import TEST_SETS, DataRecipe
from pysafe.lab.evaluate import safety_table
from pysafe.lab.inputs import (JAILBREAKS, attacked_groups, group_inputs, reference_inputs, reference_recipe,
                               safe_unsafe_inputs)

ATTACK_SWEEP = (0.5, 1.0, 2.0)  # Fig 7's budgets in the reproduce/demo clusters (multiples of the letter norm)
DEFAULT_ATTACK = {"n_soft": 2, "n_steps": 10, "eps_factor": 1.0, "norm": "l2"}


def lab_cluster_analysis(model, recipe: DataRecipe, *, n: int = 500, n_ref: int | None = None,
                         attack: dict | None = None, sets=JAILBREAKS, device="cpu", cache=None, **cap) -> dict:
    """Fig 3 of one lab model (the ``pysafe clusters`` schema): the lab's groups (each test set's headline
    input, ``n`` samples per set; with ``attack``, the attacked std_unsafe prompts, one group per budget of
    ``attack["eps_factors"]``) measured against the reference means of ``n_ref`` (default ``n``) samples
    per set from the reference stream. ``cap``: hook, positions, n_window, batch_size."""
    model.to(device)
    groups = group_inputs(recipe, n, sets)
    if attack is not None:
        adv, attack = attacked_groups(model, recipe, attack, n=n, device=device)
        groups.update(adv)
    res = cluster_analysis(model, groups, reference_inputs(recipe, n_ref or n), device=device, cache=cache, **cap)
    res["reference"] = {"n_per_set": n_ref or n, "sets": ["std_safe", "std_unsafe"],
                        "seed": reference_recipe(recipe).seed}
    res["attack"] = attack
    return res


def _attack(n: int) -> dict:
    """The adversarial column's settings: DEFAULT_ATTACK on ``n`` samples, as many as every other column."""
    return {**DEFAULT_ATTACK, "n": n}


def safety_tables(named: dict, n: int, device, eval_dir: Path, timings: dict | None = None, log=None,
                   intervals: dict | None = None, sizes: dict | None = None, bars=None) -> dict:
    """Evaluate each {label: checkpoint dir} (safety table with the adversarial column), write
    ``eval_dir/<label>.json`` and return {label: table}; ``intervals`` and ``sizes``, when given, receive
    {label: table_ci95} and {label: table_n}. ``bars``: a :class:`pysafe._progress.Bars`."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    task = (bars or Bars(False)).task("safety tables", total=len(named) * (len(TEST_SETS) + 1))
    for label, d in named.items():
        t0 = time.perf_counter()
        model, cfg = C.load_checkpoint(d)

        def step(k, total, set_name, label=label):
            task.advance(note=f"{label}: {set_name}" + (" (then the soft-token attack)" if k == total else ""))

        res = safety_table(model, DataRecipe.from_dict(cfg["data"]), n=n, device=device, attack=_attack(n),
                           progress=step)
        task.advance(note=f"{label}: done")
        write_json(eval_dir / f"{label}.json", {"checkpoint": str(d), **res})
        tables[label] = res["table"]
        if intervals is not None:
            intervals[label] = res["table_ci95"]
        if sizes is not None:
            sizes[label] = res["table_n"]
        if timings is not None:
            timings[f"eval {label}"] = time.perf_counter() - t0
        if log is not None:
            log(f"{label}: evaluated on {n} samples per set")
    return tables


def feature_cache_path(cache=None) -> Path | None:
    """Where the pooled activations of the lab analyses are cached: ``cache`` (a directory) /features.h5,
    by default in the user's cache directory (``$XDG_CACHE_HOME/pysafe``, else ``~/.cache/pysafe``);
    ``cache=False``: no cache."""
    if cache is False:
        return None
    from pysafe.svdcache import default_dir

    return Path(cache if cache not in (None, True) else default_dir()) / "features.h5"


def clusters_and_claims(named: dict, out: Path, n: int, device, log=None, weaker: dict | None = None,
                         cache=None, bars=None) -> list:
    """The analyses of Figs 3-7 on lab checkpoints (:func:`analyses`) and the paper's claims measured on
    them: claims.json entries (docs/claims.md); the caller writes claims.json. ``weaker`` maps a
    fine-tune's name to the same method at the lower learning rate (claim: the separation grows with
    fine-tuning strength)."""
    res, figs = analyses(named, out, n, device, log, cache=cache, bars=bars)
    return cluster_claims(res, weaker or {}) + figure_claims(figs, weaker or {})


def analyses(named: dict, out: Path, n: int, device, log=None, cache=None, bars=None) -> tuple[dict, dict]:
    """The analyses of Figs 3-7 on lab checkpoints: ({name: cluster_analysis()}, {name: {figure: result}}).

    Writes ``out/clusters/<name>/clusters.json`` (+ plot) for each {name: checkpoint dir} and
    ``out/figures/<name>/{colspace,rowspace,lipschitz}.{json,png}`` (column and row space of each fine-tune
    against "pretrained", Lipschitzness of every model). ``named`` must hold "pretrained". ``cache``: see
    :func:`feature_cache_path` (never inside ``out``); ``bars``: a :class:`pysafe._progress.Bars`.
    """
    res, figs = {}, {}
    base_model, _ = C.load_checkpoint(named["pretrained"])
    task = (bars or Bars(False)).task("activation analyses", total=4 * len(named) - 2)
    path = feature_cache_path(cache)
    cache = FeatureCache(path) if path is not None else contextlib.nullcontext()  # pooled activations, kept
    with cache:  # new entries are written together when the block ends
        cache = cache if path is not None else None
        for name, d in named.items():
            task.advance(0, note=f"{name}: clusters (with the attack sweep)")
            model, cfg = C.load_checkpoint(d)
            recipe = DataRecipe.from_dict(cfg["data"])
            r = lab_cluster_analysis(model, recipe, n=n, device=device, cache=cache,
                                 attack=dict(n_soft=DEFAULT_ATTACK["n_soft"], n_steps=DEFAULT_ATTACK["n_steps"],
                                             eps_factors=list(ATTACK_SWEEP), norm=DEFAULT_ATTACK["norm"]))
            r["checkpoint"] = str(d)
            write_clusters(r, out / "clusters" / name, title=name)
            res[name] = r
            task.advance(note=f"{name}: Lipschitz estimates")
            fig_dir = out / "figures" / name
            paired = safe_unsafe_inputs(recipe, n)
            f = {"lipschitz": lipschitz_analysis(model, paired, device=device)}
            task.advance(note=f"{name}: column and row space")
            plot_lipschitz(f["lipschitz"], fig_dir / "lipschitz.png", name)  # creates fig_dir
            write_json(fig_dir / "lipschitz.json", f["lipschitz"])
            if name != "pretrained":
                f["colspace"] = column_space(base_model, model)
                plot_column_space(f["colspace"], fig_dir / "colspace.png", f"{name} vs pretrained")
                write_json(fig_dir / "colspace.json", f["colspace"])
                task.advance(note=f"{name}: row space")
                f["rowspace"] = row_space(base_model, model, paired, device=device, cache=cache)
                plot_row_space(f["rowspace"], fig_dir / "rowspace.png", f"{name} vs pretrained")
                write_json(fig_dir / "rowspace.json", f["rowspace"])
                task.advance()
            figs[name] = f
            if log is not None:
                log(f"{name}: clusters and figures written")
    return res, figs


def figure_claims(figs: dict, weaker: dict) -> list:
    """The claims of Figs 4-6 from ``{name: {"colspace", "rowspace", "lipschitz"}}`` (last layer, c_fc), as
    claims.json entries (:func:`pysafe.analysis.claims.figure_claims`)."""
    return [c.to_json() for c in _figure_claims(figs, weaker)]


def cluster_claims(res: dict, weaker: dict) -> list:
    """The paper's activation-space claims, measured at the last layer from ``{name: cluster_analysis()}``, as
    claims.json entries (:func:`pysafe.analysis.claims.cluster_claims`)."""
    return [c.to_json() for c in _cluster_claims(res, weaker)]


def checkpoint_info(d: Path) -> dict:
    """Path and SHA-256 of a lab checkpoint's weights (the report names exactly what was compared)."""
    info = {"path": str(Path(d).resolve())}
    w = Path(d) / "model.safetensors"
    if w.is_file():
        h = hashlib.sha256()
        with open(w, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        info["sha256"] = h.hexdigest()
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
        info.update({k: cfg[k] for k in ("stage", "preset", "seed") if k in cfg})
    except (OSError, ValueError):
        pass
    return info

"""End-to-end lab runs: preset → settings, ``reproduce`` (everything from scratch) and ``demo``.

``reproduce`` is the paper's pipeline at a preset's scale: test data, pretraining, the three safety
fine-tunes at the paper's two learning rates, the safety table of every checkpoint, and
``pysafe analyze`` of every fine-tune against the pretrained model. ``demo`` does the cheap part of
that on the small checkpoints that ship with the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pysafe.lab.config import load_preset
from pysafe.lab.data import DataRecipe
from pysafe.lab.model import GPTConfig
from pysafe.lab.train import TrainConfig

FINETUNES = ("ssft", "dpo", "unlearn")
PAPER_LRS = (1e-4, 1e-5)
DEMO_DIR = Path(__file__).parent / "demo_checkpoints"
ATTACK_SWEEP = (0.5, 1.0, 2.0)  # Fig 7's budgets in the reproduce/demo clusters (multiples of the letter norm)
DEFAULT_ATTACK = {"n": 256, "n_soft": 2, "n_steps": 10, "eps_factor": 1.0, "norm": "l2"}
DEMO_COMMAND = "pysafe reproduce --preset cpu --out pysafe/lab/demo_checkpoints"


@dataclass
class Settings:
    preset_name: str
    model: GPTConfig
    recipe: DataRecipe
    train: TrainConfig
    eval_n: int
    raw: dict
    objective: dict  # the preset's [objectives.<stage>] options (empty for pretraining)


def stage_settings(preset: str, stage: str, *, lr=None, steps=None, batch_size=None) -> Settings:
    """The model, data recipe and training settings of ``stage`` under ``preset`` (name or TOML path).

    ``lr`` replaces the peak learning rate and scales ``min_lr`` by the same factor, so ``--lr 1e-5``
    gives the paper's second fine-tuning run (1e-5 → 1e-7) from a preset written for 1e-4 → 1e-6.
    """
    cfg = load_preset(preset)
    table = "pretrain" if stage == "pretrain" else "finetune"
    # [finetune], then the stage's own [finetune.<stage>] table over it
    tc = {k: v for k, v in cfg[table].items() if not isinstance(v, dict)}
    tc.update(cfg[table].get(stage, {}) if table == "finetune" else {})
    tc.pop("lrs", None)
    if lr is not None:
        scale = lr / float(tc.get("lr_max", TrainConfig.lr_max))
        tc["lr_max"] = lr
        tc["min_lr"] = float(tc.get("min_lr", TrainConfig.min_lr)) * scale
    if steps is not None:
        # keep the schedule's shape: warm-up and decay as fractions of the preset's run
        base_steps = int(tc.get("steps", steps))
        tc["steps"] = steps
        for key in ("warmup", "decay_steps"):
            if key in tc:
                tc[key] = min(steps, round(int(tc[key]) * steps / base_steps))
        for key in ("eval_every", "ckpt_every", "log_every"):
            if key in tc:
                tc[key] = max(1, min(int(tc[key]), steps))
    if batch_size is not None:
        tc["batch_size"] = batch_size
    where = f"preset {preset} [{table}]"
    return Settings(
        preset_name=str(cfg.get("name", preset)),
        model=GPTConfig(**cfg["model"]),
        recipe=DataRecipe.from_dict(cfg.get("data", {})),
        train=TrainConfig.from_dict(tc, where),
        eval_n=int(cfg.get("eval", {}).get("n", 2000)),
        raw=cfg,
        objective=dict(cfg.get("objectives", {}).get(stage, {})),
    )


def preset_lrs(preset: str) -> tuple:
    """The fine-tuning peak learning rates ``pysafe reproduce`` runs for ``preset`` (its ``[finetune] lrs``;
    default the paper's 1e-4 and 1e-5)."""
    return tuple(float(v) for v in load_preset(preset)["finetune"].get("lrs", PAPER_LRS))


def _attack(n: int) -> dict:
    """The adversarial column's settings: DEFAULT_ATTACK on at most ``n`` samples."""
    return {**DEFAULT_ATTACK, "n": min(DEFAULT_ATTACK["n"], n)}


def _safety_tables(named: dict, n: int, device, eval_dir: Path, timings: dict | None = None, log=None,
                   intervals: dict | None = None, sizes: dict | None = None, bars=None) -> dict:
    """Evaluate each {label: checkpoint dir} (safety table with the adversarial column), write
    ``eval_dir/<label>.json`` and return {label: table}; ``intervals`` and ``sizes``, when given, receive
    {label: table_ci95} and {label: table_n}. ``bars``: a :class:`pysafe._progress.Bars`."""
    from pysafe._progress import Bars
    from pysafe.lab import ckpt as C
    from pysafe.lab.data import TEST_SETS
    from pysafe._atomic import write_json
    from pysafe.lab.evaluate import safety_table

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


def _clusters_and_claims(named: dict, out: Path, n: int, device, log=None, weaker: dict | None = None,
                         cache=None, bars=None) -> list:
    """The analyses of Figs 3-7 on lab checkpoints (:func:`_analyses`) and the paper's claims measured on
    them: claims.json entries (docs/claims.md); the caller writes claims.json. ``weaker`` maps a
    fine-tune's name to the same method at the lower learning rate (claim: the separation grows with
    fine-tuning strength)."""
    res, figs = _analyses(named, out, n, device, log, cache=cache, bars=bars)
    return cluster_claims(res, weaker or {}) + figure_claims(figs, weaker or {})


def _analyses(named: dict, out: Path, n: int, device, log=None, cache=None, bars=None) -> tuple[dict, dict]:
    """The analyses of Figs 3-7 on lab checkpoints: ({name: cluster_analysis()}, {name: {figure: result}}).

    Writes ``out/clusters/<name>/clusters.json`` (+ plot) for each {name: checkpoint dir} and
    ``out/figures/<name>/{colspace,rowspace,lipschitz}.{json,png}`` (column and row space of each fine-tune
    against "pretrained", Lipschitzness of every model). ``named`` must hold "pretrained". ``cache``: see
    :func:`feature_cache_path` (never inside ``out``); ``bars``: a :class:`pysafe._progress.Bars`.
    """
    from pysafe.analysis.clusters import cluster_analysis, write_clusters
    from pysafe.analysis.lipschitz import lipschitz_analysis, plot_lipschitz
    from pysafe.analysis.subspaces import column_space, plot_column_space, plot_row_space, row_space
    from pysafe.lab import ckpt as C
    from pysafe._atomic import write_json

    from pysafe._progress import Bars
    from pysafe.analysis.cache import FeatureCache

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
            r = cluster_analysis(model, recipe, n=n, device=device, cache=cache,
                                 attack=dict(n_soft=DEFAULT_ATTACK["n_soft"], n_steps=DEFAULT_ATTACK["n_steps"],
                                             eps_factors=list(ATTACK_SWEEP), norm=DEFAULT_ATTACK["norm"]))
            r["checkpoint"] = str(d)
            write_clusters(r, out / "clusters" / name, title=name)
            res[name] = r
            task.advance(note=f"{name}: Lipschitz estimates")
            fig_dir = out / "figures" / name
            f = {"lipschitz": lipschitz_analysis(model, recipe, n=n, device=device)}
            task.advance(note=f"{name}: column and row space")
            plot_lipschitz(f["lipschitz"], fig_dir / "lipschitz.png", name)  # creates fig_dir
            write_json(fig_dir / "lipschitz.json", f["lipschitz"])
            if name != "pretrained":
                f["colspace"] = column_space(base_model, model)
                plot_column_space(f["colspace"], fig_dir / "colspace.png", f"{name} vs pretrained")
                write_json(fig_dir / "colspace.json", f["colspace"])
                task.advance(note=f"{name}: row space")
                f["rowspace"] = row_space(base_model, model, recipe, n=n, device=device, cache=cache)
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
    from pysafe.analysis.claims import figure_claims as claims_of

    return [c.to_json() for c in claims_of(figs, weaker)]


def cluster_claims(res: dict, weaker: dict) -> list:
    """The paper's activation-space claims, measured at the last layer from ``{name: cluster_analysis()}``, as
    claims.json entries (:func:`pysafe.analysis.claims.cluster_claims`)."""
    from pysafe.analysis.claims import cluster_claims as claims_of

    return [c.to_json() for c in claims_of(res, weaker)]


def format_claims(claims: list) -> str:
    """The claims as text: verdict, statement, effect and its 95% interval."""
    from pysafe.analysis.claims import format_claims as fmt

    return fmt(claims)


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "em").replace("e-", "em")


#: what ``reproduce`` writes directly under its ``--out`` besides the checkpoint directories
REPRODUCE_OUTPUTS = ("eval", "analyze", "clusters", "figures", "cache", "safety_table.txt", "claims.json", "summary.json",
                     "index.html")


def _pysafe_page(p: Path) -> bool:
    from pysafe.report.html import GENERATOR

    try:
        return p.is_file() and not p.is_symlink() and GENERATOR in p.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False


def _remove_reproduce_outputs(out: Path, lrs, log=print) -> None:
    """``reproduce --overwrite``: remove what reproduce writes in ``out`` (its checkpoint directories and
    report files), never anything else: a user's own files in the folder are kept."""
    names = ["pretrain", *(f"{st}_lr{_lr_tag(lr)}" for lr in lrs for st in FINETUNES), *REPRODUCE_OUTPUTS]
    removed = []
    for name in names:
        p = out / name
        if name == "index.html" and not _pysafe_page(p):
            continue  # a page of the user's: kept (write_index refuses to replace it)
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(name)
    if removed:
        log(f"--overwrite: removed {', '.join(removed)} from {out}")


def reproduce(preset: str, out, *, seed: int = 0, device: str = "cpu", eval_n: int | None = None,
              lrs=None, analyze: bool = True, checkpoints_only: bool = False, log=print,
              overwrite: bool = False, progress=None, invocation: str | None = None, jobs: int = 1,
              cache=None) -> dict:
    """Regenerate the lab end to end under ``out``; returns the summary also written to out/summary.json.

    ``lrs`` defaults to the preset's fine-tuning rates (:func:`preset_lrs`).
    Layout: ``pretrain/``, ``{ssft,dpo,unlearn}_lr1em4/`` (and ``_lr1em5``), ``eval/<ckpt>.json``,
    ``safety_table.txt``, ``analyze/<ckpt>/`` (the ``pysafe analyze`` report against ``pretrain/``).
    Stages already finished in ``out`` are reused (so an interrupted run continues where it stopped);
    ``overwrite`` starts over. ``progress(label)`` makes a per-stage progress callback (or None);
    ``invocation`` (the ``pysafe reproduce`` command line) is recorded in every checkpoint's config.
    ``jobs`` > 1 trains that many fine-tunes at once, each a ``pysafe train`` subprocess with
    cores/jobs torch threads (the lab models are small: one thread per run is nearly as fast as two, so on
    2 cores two runs at once halve the wall time). The exact command of each is in its config.json.
    ``cache``: where the base SVDs and pooled activations are cached (:func:`feature_cache_path`).
    Ends with ``out/index.html``, the report page over all of it.
    """
    from pysafe._progress import Bars
    from pysafe.lab.train import train

    lrs = preset_lrs(preset) if not lrs else tuple(lrs)
    out = Path(out)
    if overwrite and out.exists():
        _remove_reproduce_outputs(out, lrs, log)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def run_stage(stage, ckpt_dir, init=None, lr=None):
        if _finished(ckpt_dir):
            log(f"{ckpt_dir.name}: finished earlier, reused")
            return
        s = stage_settings(preset, stage, lr=lr)
        t0 = time.perf_counter()
        cmd = f"pysafe train {stage} --preset {shlex.quote(preset)} --seed {seed} --out {shlex.quote(str(ckpt_dir))}"
        if init is not None:
            cmd += f" --init {shlex.quote(str(init))}"
        if lr is not None:
            cmd += f" --lr {lr:g}"
        log(f"{ckpt_dir.name}: training ({s.train.steps} steps, batch {s.train.batch_size})")
        train(stage, ckpt_dir, model_config=s.model, recipe=s.recipe if init is None else None, train_config=s.train,
              init=init, objective_options=s.objective, seed=seed, device=device, preset=s.preset_name, command=cmd,
              provenance={"pipeline": invocation} if invocation else None,
              progress=progress(ckpt_dir.name) if progress else None)
        timings[ckpt_dir.name] = time.perf_counter() - t0

    pre = out / "pretrain"
    run_stage("pretrain", pre)
    runs = [(stage, out / f"{stage}_lr{_lr_tag(lr)}", lr) for lr in lrs for stage in FINETUNES]
    tuned = [d for _, d, _ in runs]
    todo = []
    for run in runs:
        if _finished(run[1]):
            log(f"{run[1].name}: finished earlier, reused")
        else:
            todo.append(run)
    if jobs > 1 and len(todo) > 1:
        # longest first, so the last runs of the two queues end together (the objectives differ ~3x in cost)
        todo.sort(key=lambda r: -_finetune_cost(preset, r[0], r[2]))
        timings.update(_parallel_finetunes(todo, preset, pre, seed, device, jobs, invocation, log))
    else:
        for stage, d, lr in todo:
            run_stage(stage, d, init=pre, lr=lr)

    if checkpoints_only:
        summary = {"preset": preset, "seed": seed, "checkpoints": [d.name for d in [pre, *tuned]],
                   "seconds": round(time.perf_counter() - t_start, 1), "timings": {k: round(v, 1) for k, v in timings.items()}}
        return summary
    n = eval_n or stage_settings(preset, "pretrain").eval_n
    bars = Bars(progress is not None and None)  # bars when progress is wanted and stderr is a terminal
    bars.__enter__()
    try:
        return _reproduce_reports(out, pre, tuned, lrs, n, device, log, timings, t_start, preset, seed,
                                  analyze, cache, bars)
    finally:
        bars.__exit__(None, None, None)


def _reproduce_reports(out, pre, tuned, lrs, n, device, log, timings, t_start, preset, seed, analyze, cache,
                       bars) -> dict:
    """The evaluation and analysis half of :func:`reproduce`."""
    from pysafe._atomic import write_json
    from pysafe.lab.evaluate import format_table
    from pysafe.report.html import write_index

    if bars.shown:
        log = bars.log
    intervals, sizes = {}, {}
    tables = _safety_tables({d.name: d for d in [pre, *tuned]}, n, device, out / "eval", timings, log,
                            intervals=intervals, sizes=sizes, bars=bars)
    text = format_table(tables, intervals, sizes)
    (out / "safety_table.txt").write_text(text + "\n")
    log(text)

    if analyze:
        from pysafe.report import write_report
        from pysafe.svdcache import BaseCache
        from pysafe.weights import compare

        svd_cache = None if cache is False else BaseCache(None if cache in (None, True) else cache)  # SVDs once
        for d in tuned:
            t0 = time.perf_counter()
            cmp = compare(pre, d, cache=svd_cache)
            write_report(cmp, out / "analyze" / d.name, overwrite=True)
            timings[f"analyze {d.name}"] = time.perf_counter() - t0
        log(f"analyze: {len(tuned)} reports under {out / 'analyze'}")

        t0 = time.perf_counter()
        main, rest = lrs[0], lrs[1:]
        named = {"pretrained": pre, **{st: out / f"{st}_lr{_lr_tag(main)}" for st in FINETUNES}}
        weaker = {}
        for lr in rest:
            for st in FINETUNES:
                named[f"{st}_lr{_lr_tag(lr)}"] = out / f"{st}_lr{_lr_tag(lr)}"
                weaker[st] = f"{st}_lr{_lr_tag(lr)}"
        claims = _clusters_and_claims(named, out, min(n, 500), device, log, weaker, cache=cache, bars=bars)
        write_json(out / "claims.json", claims)
        timings["clusters"] = time.perf_counter() - t0
        log(format_claims(claims))

    summary = {"preset": preset, "seed": seed, "eval_n": n, "safety_table": tables, "safety_table_ci95": intervals,
               "checkpoints": {d.name: checkpoint_info(d) for d in [pre, *tuned]},
               "seconds": round(time.perf_counter() - t_start, 1), "timings": {k: round(v, 1) for k, v in timings.items()}}
    write_json(out / "summary.json", summary)
    write_index(out)
    return summary


#: forward+backward passes per sample of each objective, relative to SSFT's (DPO: chosen and rejected
#: through the model plus a forward of both through the reference; unlearning: chosen and rejected)
STAGE_COST = {"ssft": 1.0, "dpo": 8 / 3, "unlearn": 2.0}


def _finetune_cost(preset: str, stage: str, lr) -> float:
    t = stage_settings(preset, stage, lr=lr).train
    return STAGE_COST[stage] * t.steps * t.batch_size


def _parallel_finetunes(todo, preset, pre, seed, device, jobs, invocation, log) -> dict:
    """Run the fine-tunes ``todo`` [(stage, dir, lr)] as ``pysafe train`` subprocesses, ``jobs`` at a time."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    # the children must import this very pysafe (with its compiled core), not a source tree in the cwd
    import pysafe

    root = str(Path(pysafe.__file__).resolve().parent.parent)
    launcher = f"import sys; sys.path.insert(0, {root!r}); from pysafe.cli import main; main(prog_name='pysafe')"

    def one(job):
        stage, d, lr = job
        argv = [sys.executable, "-c", launcher, "train", stage, "--preset", str(preset), "--seed", str(seed),
                "--init", str(pre), "--out", str(d), "--lr", f"{lr:g}", "--threads", str(threads), "--device", device,
                "--quiet"]
        if invocation:
            argv += ["--pipeline", invocation]
        log(f"{d.name}: training ({threads} thread{'s' if threads > 1 else ''}, in parallel)")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run(argv, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{d.name}: `pysafe train {stage}` failed: {tail[0]}")
        dt = time.perf_counter() - t0
        log(f"{d.name}: done in {dt:.0f} s")
        return d.name, dt

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, todo))


def _finished(d: Path) -> bool:
    try:
        return bool(json.loads((d / "config.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def _demo_finetunes(checkpoints: Path) -> list[Path]:
    """The fine-tune of each stage in a reproduce output: ``{stage}_lr*``, the larger learning rate's run
    where there are two."""
    found = []
    for stage in FINETUNES:
        runs = [p for p in checkpoints.glob(f"{stage}_lr*") if (p / "model.safetensors").exists()]
        runs.sort(key=lambda p: float(p.name.rsplit("_lr", 1)[1].replace("m", "-")), reverse=True)
        found.append(runs[0] if runs else checkpoints / f"{stage}_lr*")
    return found


#: files every demo folder has (checked against the user's files before the demo starts)
DEMO_FILES = ("index.html", "summary.json", "claims.json", "safety_table.txt",
              *(f"eval/{n}.json" for n in ("pretrained", *FINETUNES)))


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


def demo(out, *, eval_n: int = 500, device: str = "cpu", log=print, checkpoints: Path = DEMO_DIR,
         overwrite: bool = False, cache=None, progress: bool | None = None) -> dict:
    """The main job on the embedded default: safety table and weight analysis of the shipped fine-tunes.

    Writes ``out/eval/{pretrained,ssft,dpo,unlearn}.json`` (``pysafe eval --json`` format),
    ``out/analyze/{ssft,dpo,unlearn}/`` (``pysafe analyze`` reports against the pretrained model),
    ``out/safety_table.txt``, ``out/summary.json`` and ``out/index.html`` (the page that ties them together).
    The folder is written whole and put in place by one rename, under the rules of ``pysafe analyze --out``
    (docs/report-directory.md): a non-empty ``out`` needs ``overwrite``, which replaces pysafe's files in it
    and keeps the user's. Pooled activations are cached outside it (:func:`feature_cache_path`: ``cache``, a
    directory, or the user's cache directory; ``cache=False``: none). ``progress``: draw progress bars
    (default: when stderr is a terminal).
    """
    from pysafe._atomic import atomic_dir
    from pysafe._progress import Bars
    from pysafe.report.html import write_index
    from pysafe._version import __version__
    from pysafe._atomic import write_json
    from pysafe.lab.evaluate import format_table
    from pysafe.report import format_table as weights_table
    from pysafe.report import write_report_files
    from pysafe.svdcache import BaseCache
    from pysafe.weights import compare

    checkpoints = Path(checkpoints)
    pre = checkpoints / "pretrain"
    tuned = _demo_finetunes(checkpoints)
    missing = [str(p) for p in [pre, *tuned] if not (p / "model.safetensors").exists()]
    if missing:
        raise FileNotFoundError(f"demo checkpoints missing: {', '.join(missing)}; make them with "
                                f"`pysafe reproduce --preset cpu --checkpoints-only --out DIR` and pass "
                                f"--checkpoints DIR (the shipped set is regenerated by `{DEMO_COMMAND}`)")
    named = {"pretrained": pre, **dict(zip(FINETUNES, tuned))}
    with atomic_dir(out, overwrite=overwrite, planned=DEMO_FILES, kind="demo", log=log) as stage, \
            Bars(progress) as bars:
        say = bars.log if bars.shown else log
        root = stage.path
        intervals, sizes = {}, {}
        tables = _safety_tables(named, eval_n, device, root / "eval", intervals=intervals, sizes=sizes, bars=bars)
        text = format_table(tables, intervals, sizes)
        (root / "safety_table.txt").write_text(text + "\n")
        say(text)
        svd_cache = BaseCache(cache) if cache not in (None, False, True) else (None if cache is False else BaseCache())
        for name, d in zip(FINETUNES, tuned):  # three fine-tunes, one base: its SVDs are computed once
            cmp = compare(pre, d, cache=svd_cache)
            write_report_files(cmp, root / "analyze" / name, run_id=stage.run_id)
            say(f"\n{name} ({d.name}) vs pretrained (pysafe analyze):\n{weights_table(cmp)}")
        claims = _clusters_and_claims(named, root, min(eval_n, 500), device, cache=cache, bars=bars)
        write_json(root / "claims.json", claims)
        say("\n" + format_claims(claims))
        summary = {"pysafe_version": __version__, "run_id": stage.run_id, "eval_n": eval_n, "safety_table": tables,
                   "safety_table_ci95": intervals, "checkpoints": {k: checkpoint_info(d) for k, d in named.items()},
                   "command": "pysafe demo", "feature_cache": str(feature_cache_path(cache) or "none")}
        write_json(root / "summary.json", summary)
        write_index(root)
    return summary

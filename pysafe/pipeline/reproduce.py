"""``pysafe reproduce``: the paper's pipeline at a preset's scale, from scratch.

Test data, pretraining, the three safety fine-tunes at the preset's learning rates, the safety table of
every checkpoint, ``pysafe analyze`` of every fine-tune against the pretrained model, the activation
analyses of Figs 3-7 and the paper's claims on them, and the report page over all of it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from pysafe._atomic import write_json
from pysafe._progress import Bars
from pysafe.analysis.claims import format_claims
from pysafe.lab.config import FINETUNES, preset_lrs, stage_settings
from pysafe.lab.evaluate import format_table
from pysafe.lab.train import settings_difference, stage_config, train
from pysafe.pipeline.jobs import finetune_cost, parallel_finetunes, read_json
from pysafe.pipeline.steps import checkpoint_info, clusters_and_claims, safety_tables
from pysafe.report import write_report
from pysafe.report.html import GENERATOR, write_index
from pysafe.svdcache import BaseCache
from pysafe.weights import compare


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "em").replace("e-", "em")


#: what ``reproduce`` writes directly under its ``--out`` besides the checkpoint directories
REPRODUCE_OUTPUTS = ("eval", "analyze", "clusters", "figures", "cache", "drift_validation", "safety_table.txt", "claims.json", "summary.json",
                     "index.html")


def _pysafe_page(p: Path) -> bool:
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


def _reusable(ckpt_dir: Path, preset: str, stage: str, lr, seed: int) -> bool:
    """Whether ``ckpt_dir`` holds a finished run of ``stage`` under the settings this reproduce would train
    it with (the preset's tables at ``lr``, ``seed``). An unfinished run is not reusable (it is resumed);
    a finished one trained otherwise, e.g. before the preset changed, raises rather than being reported as
    this preset's model."""
    recorded = read_json(ckpt_dir / "config.json")
    if not recorded.get("finished"):
        return False
    s = stage_settings(preset, stage, lr=lr)
    expected = stage_config(stage, s.train, s.objective, seed)
    keys = ["stage", "seed", "train", "objective"]
    if stage == "pretrain":  # a fine-tune takes its model and data from pretrain/, checked here
        expected.update(model=asdict(s.model), data=s.recipe.to_dict())
        keys += ["model", "data"]
    diff = settings_difference(recorded, json.loads(json.dumps(expected)), keys)
    if diff is not None:
        raise ValueError(f"{ckpt_dir}: a finished {stage} run whose {diff[0]!r} differs from what preset {preset} "
                         f"trains {diff[1]}; move it away (or pass --overwrite to start over) to train it again")
    return True


def reproduce(preset: str, out, *, seed: int = 0, device: str = "cpu", eval_n: int | None = None,
              lrs=None, analyze: bool = True, checkpoints_only: bool = False, log=print,
              overwrite: bool = False, progress=None, invocation: str | None = None, jobs: int = 1,
              cache=None, validate_drift: bool = False) -> dict:
    """Regenerate the lab end to end under ``out``; returns the summary also written to out/summary.json.

    ``lrs`` defaults to the preset's fine-tuning rates (:func:`preset_lrs`).
    Layout: ``pretrain/``, ``{ssft,dpo,unlearn}_lr1em4/`` (and ``_lr1em5``), ``eval/<ckpt>.json``,
    ``safety_table.txt``, ``analyze/<ckpt>/`` (the ``pysafe analyze`` report against ``pretrain/``).
    Stages already finished in ``out`` are reused (so an interrupted run continues where it stopped);
    ``overwrite`` starts over. ``progress(label)`` makes a per-stage progress callback (or None);
    ``invocation`` (the ``pysafe reproduce`` command line) is recorded in every checkpoint's config.
    ``validate_drift`` adds the drift validation (:mod:`pysafe.pipeline.drift_lab`: benign fine-tunes of the
    main-rate unlearning model under ``drift_validation/``, their erosion and drift) and its claims to
    claims.json. ``jobs`` > 1 trains that many fine-tunes at once, each a ``pysafe train`` subprocess with
    cores/jobs torch threads (the lab models are small: on 2 cores two one-thread runs train as many steps
    per second together as one two-thread run, 6.2-6.3 on the development machine, and their queue ends
    together when the costliest start first). The exact command of each is in its config.json.
    ``cache``: where the base SVDs and pooled activations are cached (:func:`pysafe.pipeline.steps.feature_cache_path`).
    Ends with ``out/index.html``, the report page over all of it.
    """
    lrs = preset_lrs(preset) if not lrs else tuple(lrs)
    out = Path(out)
    if overwrite and out.exists():
        _remove_reproduce_outputs(out, lrs, log)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def run_stage(stage, ckpt_dir, init=None, lr=None):
        if _reusable(ckpt_dir, preset, stage, lr, seed):
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
        if _reusable(run[1], preset, run[0], run[2], seed):
            log(f"{run[1].name}: finished earlier, reused")
        else:
            todo.append(run)
    if jobs > 1 and len(todo) > 1:
        # longest first, so the last runs of the two queues end together (the objectives differ ~3x in cost)
        todo.sort(key=lambda r: -finetune_cost(preset, r[0], r[2]))
        timings.update(parallel_finetunes(todo, preset, pre, seed, device, jobs, invocation, log))
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
                                  validate_drift and dict(jobs=jobs, invocation=invocation),
                                  analyze, cache, bars)
    finally:
        bars.__exit__(None, None, None)


def _reproduce_reports(out, pre, tuned, lrs, n, device, log, timings, t_start, preset, seed, drift_validation,
                       analyze, cache,
                       bars) -> dict:
    """The evaluation and analysis half of :func:`reproduce`."""
    if bars.shown:
        log = bars.log
    intervals, sizes = {}, {}
    tables = safety_tables({d.name: d for d in [pre, *tuned]}, n, device, out / "eval", timings, log,
                            intervals=intervals, sizes=sizes, bars=bars)
    text = format_table(tables, intervals, sizes)
    (out / "safety_table.txt").write_text(text + "\n")
    log(text)

    if analyze:
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
        claims = clusters_and_claims(named, out, min(n, 500), device, log, weaker, cache=cache, bars=bars)
        if drift_validation:
            from pysafe.pipeline.drift_lab import validate_drift

            t1 = time.perf_counter()
            res = validate_drift(pre, named["unlearn"], out / "drift_validation", preset=preset, n=min(n, 500),
                                 seed=seed, device=device, log=log, **drift_validation)
            claims += res["claims"]
            timings["drift validation"] = time.perf_counter() - t1
        write_json(out / "claims.json", claims)
        timings["clusters"] = time.perf_counter() - t0
        log(format_claims(claims))

    summary = {"preset": preset, "seed": seed, "eval_n": n, "safety_table": tables, "safety_table_ci95": intervals,
               "checkpoints": {d.name: checkpoint_info(d) for d in [pre, *tuned]},
               "seconds": round(time.perf_counter() - t_start, 1), "timings": {k: round(v, 1) for k, v in timings.items()}}
    write_json(out / "summary.json", summary)
    write_index(out)
    return summary

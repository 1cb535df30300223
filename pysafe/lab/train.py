"""The one training loop: pretraining, SSFT, DPO and unlearning differ only in their objective.

Reads top to bottom like nanoGPT: build (or load) the model, the AdamW groups and the schedule, then
for each step draw the objective's batch, compute its loss, backward, clip (after backward), step.
Every ``ckpt_every`` steps the model, the optimizer state and the log are written (no pickles), and a
run started again with the same ``--out`` resumes from there. With ``keep_every`` N, the model at every N-th
step is also kept as ``out/steps/step_N/``, a checkpoint directory ``pysafe analyze`` and ``pysafe track``
read like ``out`` itself. Batches are a pure function of
``(data seed, step)``, so a resumed run is identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from pysafe.checkpoint import step_dirs
from pysafe.lab import ckpt as C
from pysafe.lab.data import DataRecipe
from pysafe.lab.lora import TARGETS, apply_lora, load_lora_factors, lora_factors
from pysafe.lab.model import GPT, GPTConfig, eval_mode
from pysafe.lab.objectives import make_objective


@dataclass
class TrainConfig:
    """One stage's optimisation settings (a ``[pretrain]`` or ``[finetune]`` table of a preset)."""

    steps: int = 100_000  # optimizer steps
    batch_size: int = 512
    lr_max: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 20_000  # linear warm-up steps from lr = 0
    decay_steps: int = 80_000  # cosine from lr_max at `warmup` to min_lr at `decay_steps`
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # applied after backward; 0 disables
    log_every: int = 50
    eval_every: int = 1000
    ckpt_every: int = 1000
    eval_n: int = 256  # held-out samples for the in-training evaluation
    keep_every: int = 0  # keep the model of every N-th step as out/steps/step_N/ (0: none)
    # LoRA-style fine-tuning (lab/lora.py): 0 trains every parameter; r >= 1 trains only rank-r factors
    # B·A added to the `lora_targets` matrices ("mlp" or "all") at scale lora_alpha / r (alpha 0: = r)
    lora_rank: int = 0
    lora_targets: str = "mlp"
    lora_alpha: float = 0.0

    @classmethod
    def from_dict(cls, d: dict, where: str = "train config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"{where}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        kw = dict(d)
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        cfg = cls(**kw)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "train config") -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "ckpt_every", "eval_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if int(self.keep_every) < 0:
            raise ValueError(f"{where}: keep_every must be >= 0 (0: keep no intermediate checkpoints), "
                             f"got {self.keep_every}")
        if not (self.lr_max > 0 and self.min_lr >= 0):
            raise ValueError(f"{where}: lr_max must be > 0 and min_lr >= 0, got {self.lr_max}, {self.min_lr}")
        if self.warmup < 0 or self.decay_steps < self.warmup:
            raise ValueError(f"{where}: need 0 <= warmup <= decay_steps, got {self.warmup}, {self.decay_steps}")
        if int(self.lora_rank) < 0 or self.lora_alpha < 0:
            raise ValueError(f"{where}: lora_rank and lora_alpha must be >= 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.lora_targets not in TARGETS:
            raise ValueError(f"{where}: lora_targets must be one of {', '.join(TARGETS)}, got {self.lora_targets!r}")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, cosine decay to ``min_lr`` at ``decay_steps``, then constant (docs/lab.md)."""
    if step < cfg.warmup:
        return cfg.lr_max * step / cfg.warmup
    if step > cfg.decay_steps:
        return cfg.min_lr
    span = max(1, cfg.decay_steps - cfg.warmup)
    ratio = (step - cfg.warmup) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr_max - cfg.min_lr)


@torch.no_grad()
def evaluate(model, objective, recipe, cfg: TrainConfig, device, ref=None) -> dict:
    """Loss and running accuracies on a fixed held-out batch (drawn from a step index training never uses)."""
    with eval_mode(model):
        if hasattr(objective, "eval_batch"):
            batch = objective.eval_batch(recipe, cfg.eval_n, device)
        else:
            batch = objective.batch(recipe, cfg.eval_n, _EVAL_STEP, cfg.steps, device)
        loss, metrics = objective.loss(model, batch, ref)
        return {"loss": float(loss), **metrics}


_EVAL_STEP = 2**40  # far beyond any training step: a disjoint stream of the same distribution


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (numba samplers are seeded per batch from the recipe)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunResult:
    out: Path
    steps: int
    resumed_from: int
    final: dict = field(default_factory=dict)
    seconds: float = 0.0


def train(
    stage: str,
    out: str | os.PathLike,
    *,
    model_config: GPTConfig | None = None,
    recipe: DataRecipe | None = None,
    train_config: TrainConfig | None = None,
    init: str | os.PathLike | None = None,
    objective_options: dict | None = None,
    seed: int = 0,
    device: str = "cpu",
    preset: str | None = None,
    command: str | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
    progress=None,
    callback=None,
) -> RunResult:
    """Run one stage and write its checkpoint directory ``out``.

    ``command`` (the equivalent ``pysafe train`` invocation) and ``provenance`` (e.g. the
    ``pysafe reproduce`` call that ran this stage) are recorded in config.json, with the pysafe version.
    ``stage`` is an objective name (pretrain, ssft, dpo, unlearn). Fine-tuning stages start from
    ``init`` (whose architecture and vocabulary they keep); DPO (and NPO unlearning) also use ``init``
    as the frozen reference. If ``out`` holds an unfinished run of the same stage, training resumes
    from its last checkpoint; a finished one is an error unless ``overwrite``. ``callback(step, model)``,
    when given, is called after every optimizer step (bench/samples_to_bar.py evaluates the model there);
    it must leave the model as it found it.
    """
    out = Path(out)
    cfg = train_config or TrainConfig()
    cfg.validate()
    objective = make_objective(stage, **(objective_options or {}))
    seed_everything(seed)

    if cfg.lora_rank and init is None:
        raise ValueError("lora_rank: a LoRA-style run fine-tunes an existing model; pass init (--init CKPT)")
    init_config = None
    if init is not None:
        base, init_config = C.load_checkpoint(init)
        model_config = base.config
        if recipe is None:
            recipe = DataRecipe.from_dict(init_config["data"])
    if model_config is None:
        raise ValueError("pretraining needs a model config (a preset's [model] table)")
    recipe = recipe or DataRecipe()

    settings = stage_config(stage, cfg, objective_options, seed, init)
    config = {
        "stage": stage,
        "preset": preset,
        "seed": seed,
        "model": asdict(model_config),
        "data": recipe.to_dict(),
        **{k: settings[k] for k in ("train", "objective", "init")},
        "init_stage": init_config.get("stage") if init_config else None,
        "command": command,
        **({"provenance": provenance} if provenance else {}),
    }
    config = _jsonable(config)

    # Model: a resumable run restores its own weights; otherwise start from init or from scratch.
    start_step, log_rows, state = 0, [], None
    if (out / "config.json").exists():
        prev = json.loads((out / "config.json").read_text())
        finished = prev.get("finished", False)
        if finished and not overwrite:
            raise FileExistsError(f"{out}: already holds a finished {prev.get('stage')} checkpoint; pass --overwrite to replace it")
        if not finished and not overwrite:
            _check_resumable(out, prev, config)
            if not cfg.lora_rank:  # a LoRA run's weights are init's (frozen) and the factors in the resume state
                model, _ = C.load_checkpoint(out)
            state = C.read_train_state(out)
            start_step = int(state["step"])
            log_rows = C.read_log(out)
    # the steps/ directories this run owns: those kept before the step it resumes from (a later one is from
    # the interrupted stretch and is written again, identically, when the run passes that step)
    kept = {s for s, _ in step_dirs(out) if s <= start_step and cfg.keep_every and s % cfg.keep_every == 0}
    if start_step == 0 or cfg.lora_rank:
        # a LoRA run restarts from init's frozen weights and, when resuming, the saved factors
        torch.manual_seed(seed)
        model = GPT(model_config) if init is None else base
    if cfg.lora_rank:
        apply_lora(model, int(cfg.lora_rank), targets=cfg.lora_targets, alpha=cfg.lora_alpha or None, seed=seed)
        if state is not None:
            prefix = "lora."
            load_lora_factors(model, {k[len(prefix):]: v for k, v in state["tensors"].items() if k.startswith(prefix)})
    model.to(device)
    model.train()

    ref = None
    if objective.uses_reference:
        ref, _ = C.load_checkpoint(init)
        ref.to(device).eval().requires_grad_(False)

    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr_max, cfg.betas)
    if state is not None:
        C.restore_train_state(state, optimizer)

    t0 = time.perf_counter()
    running: dict[str, float] = {}
    step = start_step
    for step in range(start_step, cfg.steps):
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = objective.batch(recipe, cfg.batch_size, step, cfg.steps, device)
        loss, metrics = objective.loss(model, batch, ref)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage}: loss became {float(loss.detach())} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        _update_running(running, {"loss": float(loss.detach()), **metrics})
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "lr": lr, **{k: round(v, 6) for k, v in running.items()}}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                row["eval"] = {k: round(v, 6) for k, v in evaluate(model, objective, recipe, cfg, device, ref).items()}
            log_rows.append(row)
        if progress is not None:
            progress(done, cfg.steps, running)
        if callback is not None:
            callback(done, model)
        if cfg.keep_every and done % cfg.keep_every == 0:
            C.save_step(out, done, model, {**config, "finished": True, "steps_done": done}, log_rows=log_rows)
            kept.add(done)
        if done % cfg.ckpt_every == 0 and done < cfg.steps:
            state_now = C.make_train_state(optimizer, done)
            state_now["tensors"].update({"lora." + k: v for k, v in lora_factors(model).items()})
            C.save_checkpoint(out, model, {**config, "finished": False, "step": done}, log_rows=log_rows,
                              train_state=state_now, overwrite=True, keep_steps=kept)

    final = log_rows[-1] if log_rows else {}
    C.save_checkpoint(out, model, {**config, "finished": True, "steps_done": cfg.steps, "step": cfg.steps},
                      log_rows=log_rows, overwrite=True, keep_steps=kept)
    return RunResult(out=out, steps=cfg.steps, resumed_from=start_step, final=final,
                     seconds=time.perf_counter() - t0)


def _update_running(running: dict, values: dict, alpha: float = 0.05) -> None:
    """Exponential moving averages of the step metrics (what the progress bar shows)."""
    for k, v in values.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        running[k] = v if k not in running else (1 - alpha) * running[k] + alpha * v


#: the config.json keys that decide what a stage trains (a resumed or reused run must match them all)
SETTINGS_KEYS = ("stage", "model", "data", "train", "objective", "seed", "init")


def settings_difference(prev: dict, config: dict, keys=SETTINGS_KEYS) -> tuple[str, str] | None:
    """The first of ``keys`` whose value differs between a run's recorded config ``prev`` and ``config``, as
    ``(key, "(recorded vs now)")``; None when they agree. A run written before a TrainConfig or DataRecipe
    field existed had that field's default (a new field's default leaves the streams as they were)."""
    prev = dict(prev)
    for key, defaults in (("train", _jsonable(asdict(TrainConfig()))), ("data", DataRecipe().to_dict())):
        if isinstance(prev.get(key), dict) and isinstance(config.get(key), dict):
            prev[key] = {**{k: defaults[k] for k in config[key] if k not in prev[key] and k in defaults},
                         **prev[key]}
    for key in keys:
        if prev.get(key) != config.get(key):
            return key, f"({_short(prev.get(key))} vs {_short(config.get(key))})"
    return None


def stage_config(stage: str, train_config: TrainConfig, objective_options: dict | None, seed: int,
                 init=None) -> dict:
    """What config.json records under ``stage``, ``train``, ``objective``, ``seed`` and ``init`` for these
    settings, as :func:`train` writes them (``pysafe reproduce`` checks a finished stage against it before
    reusing it)."""
    return _jsonable({"stage": stage, "seed": seed, "train": asdict(train_config),
                      "objective": asdict(make_objective(stage, **(objective_options or {}))),
                      "init": str(init) if init is not None else None})


def _check_resumable(out: Path, prev: dict, config: dict) -> None:
    diff = settings_difference(prev, config)
    if diff is not None:
        raise ValueError(f"{out}: holds an unfinished run whose {diff[0]!r} differs from this one {diff[1]}; "
                         "pass --overwrite to start over")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) < 80 else s[:77] + "..."


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))

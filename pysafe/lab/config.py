"""Lab presets: named TOML files (``paper``, ``cpu``, ``tiny``) that a user can copy and edit.

A preset has the tables ``[model]`` (:class:`~pysafe.lab.model.GPTConfig`), ``[data]`` (the data recipe,
passed through as a dict), ``[pretrain]`` and ``[finetune]`` (training settings), ``[eval]`` and
``[objectives.ssft|dpo|unlearn]`` (options of one safety objective, as ``pysafe train`` flags set them;
flags given on the command line win). ``[finetune.ssft|dpo|unlearn]`` override ``[finetune]``'s training
settings for one objective (e.g. its step count: DPO and unlearning need other sample counts than SSFT
to reach the same safety). A preset
may start from another with ``extends = "cpu"`` (a name or a path relative to the file) and override
single keys; tables merge key by key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport has the same API
    import tomli as tomllib

from pysafe.lab.data import DataRecipe
from pysafe.lab.model import GPTConfig
from pysafe.lab.train import TrainConfig

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = ("paper", "cpu", "tiny")
FINETUNES = ("ssft", "dpo", "unlearn")  # the safety fine-tuning stages, each an objective of its own
#: every fine-tuning stage a preset may configure ([finetune.<stage>], [objectives.<stage>]): the safety
#: fine-tunes and the benign fine-tune of an aligned model (not part of `pysafe reproduce`)
TUNED_STAGES = (*FINETUNES, "benign")
PAPER_LRS = (1e-4, 1e-5)  # the paper's two fine-tuning peak learning rates
DEMO_DIR = Path(__file__).parent / "demo_checkpoints"  # the cpu-preset checkpoints shipped with the package

_TOP = {"name": str, "description": str, "extends": str}
_TABLES = ("model", "data", "pretrain", "finetune", "eval", "objectives")
_INT, _FLOAT, _PAIR, _STR = "an integer", "a number", "a list of two numbers", "a string"
_RATES = "a non-empty list of positive numbers"
#: the keys of a [pretrain]/[finetune] table: TrainConfig's fields, each with the kind of value it takes
_TRAIN_KEYS = {f.name: {"int": _INT, "float": _FLOAT, "tuple[float, float]": _PAIR, "str": _STR}[str(f.type)]
               for f in fields(TrainConfig)}
_EVAL_KEYS = {"n": _INT}


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """The TOML file of a preset name (``paper``, ``cpu``, ``tiny``) or of a path.

    Raises:
        FileNotFoundError: neither a known preset name nor an existing file.
    """
    s = str(name_or_path)
    if s in PRESETS:
        return PRESET_DIR / f"{s}.toml"
    p = Path(s)
    if p.is_file():
        return p
    raise FileNotFoundError(f"preset {s!r}: not a preset name ({', '.join(PRESETS)}) and no such file")


def load_preset(name_or_path: str | os.PathLike) -> dict:
    """Read and validate a preset; returns ``{name, description, path, model, data, pretrain, finetune, eval}``.

    Raises:
        FileNotFoundError: unknown preset name or missing file.
        ValueError: malformed TOML, an unknown table or key, or a value of the wrong type; the message
            names the file and the key.
    """
    return _load(preset_path(name_or_path), ())


def _load(path: Path, seen: tuple) -> dict:
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' forms a cycle ({' -> '.join(str(p) for p in (*seen, path))})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    for key, value in raw.items():
        if key in _TOP:
            if not isinstance(value, str):
                raise ValueError(f"{path}: '{key}' must be a string, found {value!r}")
        elif key in _TABLES:
            if not isinstance(value, dict):
                raise ValueError(f"{path}: '{key}' must be a table ([{key}]), found {type(value).__name__}")
        else:
            raise ValueError(f"{path}: unknown key '{key}'; expected the tables "
                             f"{', '.join('[' + t + ']' for t in _TABLES)} and {', '.join(_TOP)}")

    cfg: dict = {t: {} for t in _TABLES}
    if "extends" in raw:
        parent = raw["extends"]
        ppath = (path.parent / parent) if parent not in PRESETS else preset_path(parent)
        if not ppath.is_file():
            raise FileNotFoundError(f"{path}: extends {parent!r}, which is neither a preset name "
                                    f"({', '.join(PRESETS)}) nor a file next to it")
        base = _load(ppath, (*seen, path.resolve()))
        cfg = {t: base[t] for t in _TABLES}
    for t in _TABLES:
        cfg[t] = _merge(cfg[t], raw.get(t, {}))
    cfg["name"] = raw.get("name", path.stem)
    cfg["description"] = raw.get("description", "")
    cfg["path"] = str(path)
    _validate(cfg, path)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    """``base`` overridden by ``over`` key by key, at every depth (so [objectives.dpo] merges like [model])."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _validate(cfg: dict, path: Path) -> None:
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(cfg["model"]) - known)
    if bad:
        raise ValueError(f"{path}: [model] has unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    try:
        GPTConfig(**cfg["model"])
    except ValueError as e:
        raise ValueError(f"{path}: [model]: {e}") from None
    _check_keys(cfg["pretrain"], _TRAIN_KEYS, path, "pretrain")
    # [finetune] also lists the peak learning rates `pysafe reproduce` fine-tunes at (default: the paper's)
    _check_keys({k: v for k, v in cfg["finetune"].items() if k not in TUNED_STAGES},
                {**_TRAIN_KEYS, "lrs": _RATES}, path, "finetune")
    for stage in TUNED_STAGES:  # [finetune.<stage>]: one objective's own training settings
        sub = cfg["finetune"].get(stage)
        if sub is not None:
            if not isinstance(sub, dict):
                raise ValueError(f"{path}: 'finetune.{stage}' must be a table ([finetune.{stage}]), found {sub!r}")
            _check_keys(sub, _TRAIN_KEYS, path, f"finetune.{stage}")
    _check_keys(cfg["eval"], _EVAL_KEYS, path, "eval")
    _check_objectives(cfg["objectives"], path)


def _check_objectives(table: dict, path: Path) -> None:
    """[objectives.<stage>]: only the safety stages, with their objective's options (checked by the objective)."""
    from pysafe.lab.objectives import make_objective

    for stage, opts in table.items():
        if stage not in TUNED_STAGES:
            raise ValueError(f"{path}: [objectives] has unknown stage '{stage}'; known: {', '.join(TUNED_STAGES)}")
        if not isinstance(opts, dict):
            raise ValueError(f"{path}: 'objectives.{stage}' must be a table ([objectives.{stage}]), found {opts!r}")
        try:
            make_objective(stage, **opts)
        except ValueError as e:
            raise ValueError(f"{path}: [objectives.{stage}] {e}") from None


def _check_keys(table: dict, spec: dict, path: Path, where: str) -> None:
    for key, value in table.items():
        kind = spec.get(key)
        if kind is None:
            raise ValueError(f"{path}: [{where}] has unknown key '{key}'; known: {', '.join(spec)}")
        ok = {
            _INT: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
            _STR: isinstance(value, str),
            _PAIR: isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            _RATES: isinstance(value, list) and len(value) >= 1
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value),
        }[kind]
        if not ok:
            extra = " (non-negative)" if kind == _INT else ""
            raise ValueError(f"{path}: [{where}] {key} must be {kind}{extra}, found {value!r}")


# -- a stage's settings under a preset -----------------------------------------------------------------
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

"""Lab checkpoints: a directory that ``pysafe analyze`` opens directly, written without pickle.

Layout of a checkpoint directory::

    model.safetensors        weights, names as in GPT.state_dict() (no ``module.`` prefix)
    config.json              architecture ("model" = GPTConfig fields), vocabulary, data recipe, stage,
                             seed, preset, pysafe version, command line, and the caller's other keys
    train_log.jsonl          one JSON object per logged step
    train_state.safetensors  (resumable runs only) AdamW moments and step, RNG states as uint8/int64 tensors
    train_state.json         (resumable runs only) step, optimizer hyper-parameters, the scalar RNG fields
    steps/step_000250/       (``pysafe train --keep-every 250``) the model as it was at step 250: a complete
                             checkpoint directory of its own (weights, config.json with its "step", log)

A directory is written whole into a hidden sibling and then renamed into place, so a crash never leaves
a complete-looking half-written checkpoint; an existing directory is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from pysafe._atomic import replace_dir
from pysafe.checkpoint import STEPS_DIR, step_dir_name
from pysafe.errors import CheckpointError, ShapeMismatchError, TensorNotFoundError
from pysafe.lab.model import GPT, GPTConfig
from pysafe.lab.vocab import TOKENS

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LOG = "train_log.jsonl"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
FORMAT = "pysafe-lab-checkpoint"
FORMAT_VERSION = 1


# -- writing ---------------------------------------------------------------------------------------
def _save_safetensors(tensors: dict, path: Path, metadata: dict | None) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and the metadata.

    The safetensors library keeps ``__metadata__`` in a Rust HashMap, so its key order (and with it the
    file's bytes) changes from one call to the next. The run's promise is byte-identical weights for the
    same preset, seed and stage, so the header is re-written here with sorted metadata keys, in the
    library's own compact JSON and space padding; offsets are relative to the data section and unchanged.
    """
    data = save(tensors)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(memoryview(data)[8 + n:])


def save_checkpoint(out_dir: str | os.PathLike, model: GPT, config: dict | None = None, log_rows=None,
                    train_state: dict | None = None, *, overwrite: bool = False, command: str | None = None,
                    keep_steps=()) -> Path:
    """Write ``model`` (and optionally its log and resume state) as the checkpoint directory ``out_dir``.

    Args:
        out_dir: the directory to create.
        model: a :class:`GPT`; its ``config`` is written as ``config.json["model"]``.
        config: JSON-serialisable run metadata (stage, seed, preset, "data" recipe, ...). A "model" entry,
            if present, must equal the model's architecture.
        log_rows: list of dicts, written one per line to ``train_log.jsonl``.
        train_state: from :func:`make_train_state`; makes the checkpoint resumable.
        overwrite: replace an existing ``out_dir``.
        command: the exact command line (stored as "command" unless ``config`` already has one).
        keep_steps: steps whose ``out_dir/steps/step_N`` directories the new directory keeps (hard links to
            the same files, so the old directory stays whole until the new one replaces it); any other
            ``steps/`` entry of the old directory is dropped with it.

    Returns:
        The path of the checkpoint directory.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ValueError: ``config["model"]`` disagrees with the model, or ``config`` is not JSON-serialisable.
    """
    from pysafe._version import __version__

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    arch = asdict(model.config)
    meta = dict(config or {})
    if "model" in meta and meta["model"] != arch:
        raise ValueError(f"{out}: config['model'] {meta['model']} differs from the model's architecture {arch}")
    meta.update({"format": FORMAT, "format_version": FORMAT_VERSION, "model": arch, "vocabulary": list(TOKENS),
                 "pysafe_version": __version__})
    if command is not None and meta.get("command") is None:
        meta["command"] = command
    try:
        config_text = json.dumps(meta, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{out}: config is not JSON-serialisable: {e}") from None

    with replace_dir(out, overwrite=overwrite) as tmp:
        _save_safetensors(_plain_state(model), tmp / WEIGHTS, {"format": "pt", "pysafe": FORMAT})
        with open(tmp / LOG, "w", encoding="utf-8") as f:
            for row in log_rows or []:
                f.write(json.dumps(row) + "\n")
        if train_state is not None:
            _save_safetensors(train_state["tensors"], tmp / STATE_TENSORS, None)
            _write_text(tmp / STATE_JSON, json.dumps({"step": train_state["step"], **train_state["meta"]}, indent=1))
        _write_text(tmp / CONFIG, config_text)  # last: a directory with config.json is complete
        mode = 0o666 & ~_umask()  # safetensors writes 0600; a checkpoint is as readable as any other file
        for f in tmp.iterdir():
            os.chmod(f, mode)
            _fsync(f)
        _link_steps(out, tmp, keep_steps)
    return out


def _link_steps(out: Path, tmp: Path, steps) -> None:
    """Hard-link the files of ``out/steps/step_N`` (N in ``steps``) into the staging directory ``tmp``
    (a copy where the file system has no hard links). Checkpoint files are never modified in place, so
    the old and the new directory can share them."""
    for step in sorted(set(steps)):
        name = step_dir_name(step)
        src = out / STEPS_DIR / name
        if not (src / CONFIG).is_file():
            continue
        dst = tmp / STEPS_DIR / name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)


def save_step(out_dir: str | os.PathLike, step: int, model: GPT, config: dict, log_rows=None) -> Path:
    """Write ``out_dir/steps/step_N`` (N = ``step``): the model at this step as a checkpoint directory of its
    own, atomically (a rerun of the same step replaces it), with ``"step"`` in its config.json."""
    d = Path(out_dir) / STEPS_DIR / step_dir_name(step)
    return save_checkpoint(d, model, {**config, "step": int(step)}, log_rows=log_rows, overwrite=True)


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies with no shared storage (safetensors refuses shared tensors), under the plain
    parameter names."""
    from pysafe.lab.lora import merged_state

    out, seen = {}, set()
    for name, t in merged_state(model).items():  # a LoRA-style model: its merged weights W₀ + scale·B·A
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ---------------------------------------------------------------------------------------
def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint directory.

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        CheckpointError: config.json is not a JSON object.
    """
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such checkpoint directory")
    path = d / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a lab checkpoint directory holds {WEIGHTS} and {CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def model_config(cfg: dict, where: str = CONFIG) -> GPTConfig:
    """The :class:`GPTConfig` stored under ``cfg["model"]``; raises CheckpointError naming the key."""
    arch = cfg.get("model")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{where}: no 'model' object (the architecture); found {arch!r}")
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(arch) - known)
    if bad:
        raise CheckpointError(f"{where}: model.{bad[0]} is not a GPTConfig field (known: {', '.join(sorted(known))})")
    try:
        return GPTConfig(**arch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_checkpoint(ckpt_dir: str | os.PathLike, expect: GPTConfig | dict | None = None,
                    device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Load a lab checkpoint directory, validating config.json against the weights.

    Args:
        ckpt_dir: a directory written by :func:`save_checkpoint`.
        expect: a :class:`GPTConfig` (or a dict of some of its fields) the architecture must match.
        device: where to put the model.

    Returns:
        ``(model, config)``: the :class:`GPT` in eval mode and the parsed config.json.

    Raises:
        FileNotFoundError: the directory, model.safetensors or config.json is missing.
        CheckpointError: config.json is malformed, has another vocabulary, differs from ``expect``, or
            the weights hold unexpected tensors; HeaderError for a malformed safetensors file.
        TensorNotFoundError: a tensor the architecture needs is missing.
        ShapeMismatchError: a tensor's shape differs from the architecture's.
    """
    d = Path(ckpt_dir)
    cfg = read_config(d)
    where = str(d / CONFIG)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing")
    gcfg = model_config(cfg, where)
    vocab = cfg.get("vocabulary")
    if vocab is not None and list(vocab) != list(TOKENS):
        diff = next((i for i, (a, b) in enumerate(zip(vocab, TOKENS)) if a != b), min(len(vocab), len(TOKENS)))
        found = vocab[diff] if diff < len(vocab) else "<end>"
        want = TOKENS[diff] if diff < len(TOKENS) else "<end>"
        raise CheckpointError(f"{where}: vocabulary differs from this pysafe's at id {diff}: "
                              f"expected {want!r}, found {found!r} ({len(TOKENS)} vs {len(vocab)} tokens)")
    if expect is not None:
        want = asdict(expect) if isinstance(expect, GPTConfig) else dict(expect)
        have = asdict(gcfg)
        for key, value in want.items():
            if key not in have:
                raise ValueError(f"expect: {key!r} is not a GPTConfig field")
            if have[key] != value:
                raise CheckpointError(f"{where}: model.{key} is {have[key]!r} but {value!r} was expected")

    from pysafe.linalg import read_header

    read_header(str(weights))  # the engine's validator: raises HeaderError naming the file and condition
    state = load_file(str(weights))
    model = GPT(gcfg)
    need = model.state_dict()
    missing = [n for n in need if n not in state]
    if missing:
        raise TensorNotFoundError(f"{weights}: missing tensor '{missing[0]}' required by {CONFIG} "
                                  f"({len(missing)} missing in all)")
    extra = [n for n in state if n not in need]
    if extra:
        raise CheckpointError(f"{weights}: unexpected tensor '{extra[0]}' for the architecture in {CONFIG} "
                              f"({len(extra)} unexpected in all)")
    for name, t in need.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ShapeMismatchError(f"{weights}: tensor '{name}' has shape {list(state[name].shape)} but "
                                     f"{CONFIG} implies {list(t.shape)}")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{weights}: tensor '{name}' has dtype {state[name].dtype}, expected a float")
    model.load_state_dict(state)
    model.to(device).eval()
    return model, cfg


def read_log(ckpt_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``train_log.jsonl`` (empty if there is none)."""
    path = Path(ckpt_dir) / LOG
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise CheckpointError(f"{path}: line {i} is not valid JSON: {e}") from None
    return rows


# -- resume state ------------------------------------------------------------------------------------
def make_train_state(optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Optimizer state and RNG states as ``{"step", "tensors", "meta"}``: tensors for safetensors, the rest JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.state.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]

    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    tensors["rng.python.state"] = torch.tensor(py_state, dtype=torch.int64)
    meta = {
        "optimizer": {"type": type(optimizer).__name__, "param_groups": groups, "state_scalars": scalars},
        "rng": {"numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                          "cached_gaussian": float(np_gauss)},
                "python": {"version": py_version, "gauss_next": py_gauss}},
    }
    return {"step": int(step), "tensors": tensors, "meta": meta}


def read_train_state(ckpt_dir: str | os.PathLike) -> dict:
    """The resume state saved with a checkpoint (see :func:`make_train_state`).

    Raises:
        FileNotFoundError: the checkpoint has no train_state files (it was saved as final).
        CheckpointError: train_state.json is malformed.
    """
    d = Path(ckpt_dir)
    tpath, jpath = d / STATE_TENSORS, d / STATE_JSON
    for p in (tpath, jpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; this checkpoint cannot be resumed")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
        step = int(meta.pop("step"))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{jpath}: malformed resume state: {e!r}") from None
    return {"step": step, "tensors": load_file(str(tpath)), "meta": meta}


def restore_train_state(state: dict, optimizer: torch.optim.Optimizer) -> int:
    """Load the optimizer state and the RNG states of ``state`` into this process; returns the step.

    Raises:
        CheckpointError: the optimizer's type or parameter groups differ from the saved ones.
        ShapeMismatchError: a saved moment's shape differs from its parameter's.
    """
    meta, tensors = state["meta"], state["tensors"]
    om = meta["optimizer"]
    if om["type"] != type(optimizer).__name__:
        raise CheckpointError(f"{STATE_JSON}: saved for {om['type']}, restoring into {type(optimizer).__name__}")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in om["param_groups"]]
    cur = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in cur]:
        raise CheckpointError(f"{STATE_JSON}: parameter groups of sizes {[len(g['params']) for g in groups]}, "
                              f"the optimizer has {[len(g['params']) for g in cur]}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict] = {}
    prefix = "optimizer.state."
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            opt_state.setdefault(int(pid), {})[key] = t
    for pid, sc in om["state_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(sc)
    for pid, st in opt_state.items():
        if pid >= len(params):
            raise CheckpointError(f"{STATE_TENSORS}: state for parameter {pid}, the optimizer has {len(params)}")
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[pid].shape):
                raise ShapeMismatchError(f"{STATE_TENSORS}: 'optimizer.state.{pid}.{key}' has shape {list(t.shape)}, "
                                         f"its parameter has {list(params[pid].shape)}")
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

    rng = meta["rng"]
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = rng["numpy"]
    np.random.set_state((n["name"], tensors["rng.numpy.keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(v) for v in tensors["rng.python.state"].tolist()), p["gauss_next"]))
    return int(state["step"])


def load_train_state(ckpt_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> int:
    """:func:`read_train_state` + :func:`restore_train_state`; returns the step to resume from."""
    return restore_train_state(read_train_state(ckpt_dir), optimizer)

"""Open any checkpoint kind of docs/metrics.md and map tensor names to (layer, module).

A :class:`Checkpoint` is an index of tensor name -> where its bytes live, built from headers
alone before any data is read (the mergekit pattern). Bytes are served as read-only views into
memory maps of the safetensors files, or, for PyTorch ``.bin``/``.pth`` files, from
``torch.load(weights_only=True)`` (never arbitrary unpickling).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pysafe._loader import _core
from pysafe.errors import CheckpointError, ShardIndexError, TensorNotFoundError, printable

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pth", ".pt")

#: real floating dtypes the core upcasts (F4 is OCP MX E2M1, two per byte, the first in the low nibble)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"}
#: dtypes the format allows that pysafe reads as bytes but does not turn into real values, and why
UNSUPPORTED_DTYPES = {
    "C64": "complex dtype C64: the weight-delta metrics are defined for real weights",
    "F6_E2M3": "F6_E2M3 (6-bit, packed): no reference reader fixes its bit packing, so it is not decoded",
    "F6_E3M2": "F6_E3M2 (6-bit, packed): no reference reader fixes its bit packing, so it is not decoded",
}
_DTYPE_BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
               "I16": 16, "U16": 16, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
_NPY_MAX_DIMS = 64
_NPY_MAX_BYTES = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``dtype`` uses the safetensors spelling (``BF16``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int  # byte offset in the file's data section (for read ordering)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _DTYPE_BITS.get(self.dtype, 8) // 8

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES


def _check_numpy_shape(t: TensorInfo, itemsize: int) -> None:
    """Refuse, with pysafe's own error, a shape the format allows but a NumPy array cannot take."""
    where = f"{t.file}: tensor '{printable(t.name)}'"
    if len(t.shape) > _NPY_MAX_DIMS:
        raise CheckpointError(f"{where} has {len(t.shape)} dimensions; NumPy arrays hold at most {_NPY_MAX_DIMS}, "
                              "so it cannot be read as an array")
    n = itemsize
    for d in t.shape:  # NumPy's own rule: the nonzero dimensions times the item size must fit in a signed 64-bit
        n *= d or 1
    if n > _NPY_MAX_BYTES:
        raise CheckpointError(f"{where} has shape {list(t.shape)}: its dimensions times {itemsize} bytes exceed "
                              f"2^63-1, the largest extent of a NumPy array (even an empty one)")


@dataclass
class Checkpoint:
    """A checkpoint's tensor index. Open with :meth:`Checkpoint.open`.

    Attributes:
        path: what the user gave.
        format: ``safetensors`` (one file), ``sharded`` (index + shards), ``shards`` (a directory
            of ``*.safetensors`` with no index), ``torch`` (``.bin``/``.pth`` via weights_only),
            or ``peft`` (an adapter, see :class:`PeftAdapter`).
        tensors: name -> :class:`TensorInfo`, names kept verbatim.
    """

    path: str
    format: str
    tensors: dict[str, TensorInfo]
    files: list[str]
    header_digest: str

    def __repr__(self) -> str:
        return (f"Checkpoint({self.path!r}, format={self.format!r}, {len(self.tensors)} tensors, "
                f"{len(self.files)} file{'s' if len(self.files) != 1 else ''})")
    _open: dict = field(default_factory=dict, repr=False)
    _torch: dict = field(default_factory=dict, repr=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint | PeftAdapter":
        """Open a checkpoint directory or file of any kind in docs/metrics.md.

        Raises:
            FileNotFoundError: the path does not exist.
            CheckpointError: no weights found, or a file is unreadable.
            HeaderError / ShardIndexError: malformed safetensors header or shard index.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        if p.is_file():
            if p.suffix == ".safetensors":
                return cls._from_safetensors(str(path), [p], "safetensors")
            if p.suffix in TORCH_SUFFIXES:
                return cls._from_torch(str(path), [p])
            raise CheckpointError(f"{path}: unsupported file type '{p.suffix}' "
                                  "(expected .safetensors, .bin, .pth or a checkpoint directory)")
        if (p / SAFETENSORS_INDEX).exists():
            return cls._from_index(str(path), p / SAFETENSORS_INDEX)
        if (p / SAFETENSORS_SINGLE).exists():
            return cls._from_safetensors(str(path), [p / SAFETENSORS_SINGLE], "safetensors")
        if (p / PEFT_CONFIG).exists():
            return PeftAdapter.from_dir(p)
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            return cls._from_safetensors(str(path), shards, "shards")
        if (p / TORCH_INDEX).exists():
            weight_map, _ = _core.parse_shard_index(str(p / TORCH_INDEX))
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise ShardIndexError(f"{p / TORCH_INDEX}: points to shard '{f.name}', which does not exist")
            return cls._from_torch(str(path), files)
        torch_files = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES and f.is_file())
        if torch_files:
            return cls._from_torch(str(path), torch_files)
        raise CheckpointError(
            f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, *.safetensors, "
            f"{PEFT_CONFIG}, {TORCH_INDEX}, *.bin, *.pth)")

    @classmethod
    def _from_safetensors(cls, path: str, files: list[Path], fmt: str,
                          expected: dict[str, str] | None = None) -> "Checkpoint":
        tensors: dict[str, TensorInfo] = {}
        digest = hashlib.sha256()
        for f in files:
            header = _core.read_header(str(f))  # validates; raises HeaderError naming the file
            digest.update(f.name.encode())
            digest.update(_header_bytes(f))
            for e in header["entries"]:
                name = e["name"]
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor '{printable(name)}' appears in both "
                                          f"{Path(tensors[name].file).name} and {f.name}")
                tensors[name] = TensorInfo(name, e["dtype"], tuple(e["shape"]), str(f), e["data_offsets"][0])
        if expected is not None:
            for name, shard in expected.items():
                if name not in tensors:
                    raise ShardIndexError(f"{path}/{SAFETENSORS_INDEX}: lists tensor '{printable(name)}' in shard "
                                          f"'{printable(shard)}', but that shard's header has no such tensor")
                if Path(tensors[name].file).name != shard:
                    raise ShardIndexError(f"{path}/{SAFETENSORS_INDEX}: lists tensor '{printable(name)}' in shard "
                                          f"'{printable(shard)}', but it is in '{Path(tensors[name].file).name}'")
        return cls(path, fmt, tensors, [str(f) for f in files], digest.hexdigest())

    @classmethod
    def _from_index(cls, path: str, index: Path) -> "Checkpoint":
        weight_map, _ = _core.parse_shard_index(str(index))
        if not weight_map:
            raise ShardIndexError(f"{index}: weight_map is empty")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not (index.parent / s).exists():
                raise ShardIndexError(f"{index}: points to shard '{s}', which does not exist in {index.parent}")
        files = [index.parent / s for s in shards]
        ckpt = cls._from_safetensors(path, files, "sharded", expected=weight_map)
        # Tensors present in a shard but absent from the index are left out, as transformers does.
        ckpt.tensors = {n: t for n, t in ckpt.tensors.items() if n in weight_map}
        return ckpt

    @classmethod
    def _from_torch(cls, path: str, files: list[Path]) -> "Checkpoint":
        import torch  # the slow path: torch.load(weights_only=True) only, never arbitrary unpickling

        tensors: dict[str, TensorInfo] = {}
        store: dict[str, object] = {}
        digest = hashlib.sha256()
        for f in files:
            try:
                # mmap only works for the zip format; legacy (pre-1.6) pickles must load without it.
                # torch warns (two lines on stderr) about any pickle protocol above 2 before it refuses
                # or loads it; the refusal reason goes into our one-line error instead.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
            except Exception as exc:  # noqa: BLE001 - torch raises many types; name the file
                raise CheckpointError(f"{f}: cannot be read with torch.load(weights_only=True): "
                                      f"{_torch_load_reason(f, exc)}") from exc
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict (name -> tensor), found {type(sd).__name__}")
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor '{printable(name)}' appears in both "
                                          f"{Path(tensors[name].file).name} and {f.name}")
                dtype = _torch_dtype_map().get(t.dtype)
                if dtype is None:
                    continue
                tensors[name] = TensorInfo(name, dtype, tuple(t.shape), str(f), len(tensors))
                store[name] = t
                digest.update(f"{name}:{dtype}:{tuple(t.shape)}".encode())
        ckpt = cls(path, "torch", tensors, [str(f) for f in files], digest.hexdigest())
        ckpt._torch = store
        return ckpt

    # -- access -------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            near = difflib.get_close_matches(name, list(self.tensors), n=3)
            raise TensorNotFoundError(f"{self.path}: no tensor '{printable(name)}'"
                                      + (f"; nearest: {', '.join(printable(n) for n in near)}" if near else "")) from None

    def buffer(self, name: str):
        """Raw bytes of a tensor (a read-only uint8 view; zero-copy for safetensors)."""
        t = self.info(name)
        if self.format == "torch":
            import torch

            x = self._torch[name].contiguous()
            return x.view(torch.uint8).reshape(-1).numpy() if x.numel() else x.numpy().view("uint8")
        f = self._open.get(t.file)
        if f is None:
            f = self._open[t.file] = _core.SafetensorsFile(t.file)
        return f.buffer(name)

    def advise(self, name: str, how: str) -> None:
        """madvise a tensor's pages ('willneed' to prefetch, 'dontneed' to release)."""
        t = self.tensors.get(name)
        if t is None or self.format == "torch":
            return
        f = self._open.get(t.file)
        if f is None:
            f = self._open[t.file] = _core.SafetensorsFile(t.file)
        f.advise(name, how)

    def read(self, name: str, dtype: str = "f32"):
        """A tensor as a new NumPy array: upcast to float32/float64 (any stored dtype)."""
        t = self.info(name)
        if t.dtype in UNSUPPORTED_DTYPES:
            raise CheckpointError(f"{t.file}: tensor '{printable(name)}' cannot be read as real values: "
                                  f"{UNSUPPORTED_DTYPES[t.dtype]}")
        _check_numpy_shape(t, 8 if dtype == "f64" else 4)
        return _core.upcast(self.buffer(name), t.dtype, list(t.shape), dtype == "f64")

    def close(self) -> None:
        self._open.clear()
        self._torch.clear()

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "format": self.format, "n_tensors": len(self.tensors),
                "header_digest": self.header_digest}


def _torch_load_reason(f: Path, exc: Exception) -> str:
    """The one useful line of a torch.load failure (its text suggests weights_only=False: never do that)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    refused = "Weights only load failed" in text or "WeightsUnpickler error:" in text
    with open(f, "rb") as fh:
        magic = fh.read(2)
    if not refused and not zipfile.is_zipfile(f) and not magic.startswith(b"\x80"):
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            # the reason follows on the same line, or (for some refusals) on the next non-empty one
            rest = [line.split("WeightsUnpickler error:", 1)[1].strip()] + [ln.strip() for ln in lines[i + 1:]]
            reason = next((r for r in rest if r), "")
            return _name_opcode(reason) + " (refused: only tensors are loaded)"
    useful = [ln.strip() for ln in lines
              if ln.strip() and "weights_only" not in ln and not ln.strip().startswith("Check the documentation")]
    if useful and (refused or isinstance(exc, pickle.UnpicklingError)):
        return useful[0] + " (refused: only tensors are loaded)"
    return useful[0] if useful else type(exc).__name__


def _name_opcode(reason: str) -> str:
    """'Unsupported operand 149' -> '... (pickle opcode FRAME, 0x95)': say which instruction was refused."""
    m = re.fullmatch(r"Unsupported operand (\d+)", reason)
    if not m:
        return reason
    import pickletools

    code = int(m.group(1))
    op = pickletools.code2op.get(chr(code)) if code < 256 else None
    name = f"pickle opcode {op.name}, 0x{code:02x}, protocol {op.proto}+" if op else f"pickle opcode 0x{code:02x}"
    return f"{reason} ({name})"


def _header_bytes(f: Path) -> bytes:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(n)


@functools.lru_cache(maxsize=1)
def _torch_dtype_map() -> dict:
    import torch

    m = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
    for attr, st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
                     ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("complex64", "C64"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, attr):
            m[getattr(torch, attr)] = st
    return m




# -- PEFT adapters --------------------------------------------------------------------------------
@dataclass
class LoraTarget:
    """One adapted module: ΔW = scale · B · A, A (r×in) and B (out×r) in torch Linear layout."""

    base_name: str  # the base checkpoint's weight name, e.g. model.layers.0.self_attn.q_proj.weight
    a_name: str
    b_name: str
    rank: int
    scale: float


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)."""

    path: str
    weights: Checkpoint
    config: dict
    targets: list[LoraTarget]
    format: str = "peft"

    def __repr__(self) -> str:
        return f"PeftAdapter({self.path!r}, {len(self.targets)} adapted modules)"

    @property
    def header_digest(self) -> str:
        return self.weights.header_digest

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.weights.tensors

    @classmethod
    def from_dir(cls, p: Path) -> "PeftAdapter":
        cfg_path = p / PEFT_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type '{ptype}' is not supported (only LORA adapters)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (ΔW is not B·A)")
        if (p / PEFT_WEIGHTS).exists():
            weights = Checkpoint._from_safetensors(str(p), [p / PEFT_WEIGHTS], "safetensors")
        elif (p / "adapter_model.bin").exists():
            weights = Checkpoint._from_torch(str(p), [p / "adapter_model.bin"])
        else:
            raise CheckpointError(f"{p}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS} or adapter_model.bin")
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", r_default))
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        targets = []
        for a_name in sorted(weights.tensors):
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[^.]+)?\.weight$", a_name)
            if not m:
                continue
            module = m.group(1)
            b_name = a_name.replace(".lora_A", ".lora_B")
            if b_name not in weights.tensors:
                raise CheckpointError(f"{p / PEFT_WEIGHTS}: '{a_name}' has no matching '{b_name}'")
            a_info, b_info = weights.tensors[a_name], weights.tensors[b_name]
            if len(a_info.shape) != 2 or len(b_info.shape) != 2 or a_info.shape[0] != b_info.shape[1]:
                raise CheckpointError(f"{p / PEFT_WEIGHTS}: '{module}' has lora_A {list(a_info.shape)} and "
                                      f"lora_B {list(b_info.shape)}; expected (r, in) and (out, r)")
            r = a_info.shape[0]
            alpha = _pattern_value(alpha_pattern, module, alpha_default)
            # the scale uses the stored factors' rank: a rank_pattern entry that disagrees with them is stale
            scale = alpha / (r ** 0.5 if rslora else r)
            targets.append(LoraTarget(module + ".weight", a_name, b_name, r, scale))
        if not targets:
            raise CheckpointError(f"{p}: adapter holds no lora_A/lora_B pairs")
        return cls(str(p), weights, cfg, targets)

    def describe(self) -> dict:
        d = self.weights.describe()
        d["format"] = "peft"
        d["n_tensors"] = len(self.targets)
        return d

    def close(self) -> None:
        self.weights.close()


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches alpha_pattern (and rank_pattern) keys as regexes on the module name's tail.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


# -- names -> (layer, module) ---------------------------------------------------------------------
@dataclass(frozen=True)
class NameInfo:
    """Where a tensor sits in the network. ``transposed``: stored (in, out) like HF GPT-2 Conv1D."""

    layer: int | None
    module: str
    transposed: bool = False


_LLAMA = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_META = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(wq|wk|wv|wo|w1|w2|w3)\.weight$")
_GPT2 = re.compile(r"(?:^|\.)h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_LAB = re.compile(r"^transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|c_fc|c_proj)\.weight$")
_META_MODULE = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}
_GPT2_MODULE = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down",
                "c_fc": "up", "c_proj": "down"}

#: display order of modules in tables and heatmaps
MODULE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "down"]


def detect_scheme(names: Iterable[str]) -> str:
    """Naming scheme of a checkpoint: ``llama``, ``meta``, ``gpt2``, ``lab`` or ``unknown``.

    HF GPT-2 and the lab model share ``transformer.h.{L}.attn.c_attn``; they differ in where the MLP
    sits (``h.{L}.mlp.c_fc`` vs ``h.{L}.c_fc``) and in storage (Conv1D (in, out) vs Linear (out, in)).
    """
    names = list(names)
    if any(_LLAMA.search(n) for n in names):
        return "llama"
    if any(_META.match(n) for n in names):
        return "meta"
    if any(re.search(r"(?:^|\.)h\.\d+\.mlp\.c_fc\.weight$", n) for n in names):
        return "gpt2"
    if any(_LAB.match(n) for n in names):
        return "lab"
    return "unknown"


def name_info(name: str, scheme: str) -> NameInfo:
    """Map a tensor name to (layer, module) under a scheme; unknown names keep an empty module."""
    if scheme == "llama" and (m := _LLAMA.search(name)):
        return NameInfo(int(m.group(1)), m.group(3))
    if scheme == "meta" and (m := _META.match(name)):
        return NameInfo(int(m.group(1)), _META_MODULE[m.group(3)])
    if scheme == "gpt2" and (m := _GPT2.search(name)):
        return NameInfo(int(m.group(1)), _GPT2_MODULE[m.group(2)], transposed=True)
    if scheme == "lab" and (m := _LAB.match(name)):
        return NameInfo(int(m.group(1)), _GPT2_MODULE[m.group(2)])
    return NameInfo(None, "")


# -- a training run's intermediate checkpoints ----------------------------------------------------------------
#: ``RUN/steps/step_000250/``: the intermediate checkpoints of a run (``pysafe train --keep-every``), each a
#: complete checkpoint directory
STEPS_DIR = "steps"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_000250``: the directory name of the checkpoint kept at ``step`` (six digits or more)."""
    return f"step_{int(step):06d}"


def step_dirs(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``RUN/steps/step_N`` directory, by step (empty when there are none)."""
    d = Path(run) / STEPS_DIR
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out)

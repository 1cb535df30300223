"""Run one file through pysafe's reader and through the ``safetensors`` library, and judge the pair.

Verdicts (``check`` returns one, with a detail string):

- ``both_reject`` / ``both_accept``: agreement (for ``both_accept`` every tensor the reference reads
  has the same dtype, shape and bytes in pysafe, and pysafe's upcast equals torch's bit for bit).
- ``stricter``: pysafe refuses a file the reference accepts (allowed: pysafe refuses unknown keys in
  a tensor entry, shape values of 2^63 and above, and header JSON the reference tolerates).
- ``lenient``: pysafe accepts a file the reference refuses. A failure.
- ``mismatch``: both accept but a name, dtype, shape, byte or upcast value differs. A failure.
- ``exception``: pysafe raised something other than its documented errors (HeaderError and the
  other ``pysafe.errors`` classes, FileNotFoundError), or an error message that is not one
  printable line naming the file. A failure.

Crashes and hangs are seen by the campaign runner (each case in a child process with a timeout).
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import safe_open

from pysafe import _core
from pysafe.checkpoint import Checkpoint
from pysafe.errors import PysafeError

FAILURES = ("lenient", "mismatch", "exception")

# Dtypes whose values torch can turn into float32, for the upcast comparison.
_TORCH_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}


def _message_problem(msg: str, path: str) -> str | None:
    if path not in msg:
        return "message does not name the file"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in msg):
        return "message holds a control character"
    try:
        msg.encode("utf-8")
    except UnicodeEncodeError:
        return "message is not valid Unicode text (lone surrogate)"
    return None


def _reference(path: str):
    """(accepted, {name: (dtype, shape, bytes | None, float32 values | None)}) from safetensors."""
    try:
        f = safe_open(path, framework="pt")
    except Exception:  # noqa: BLE001 - any refusal of the reference counts as reject
        return False, {}
    out = {}
    with f:
        for name in f.keys():
            try:
                t = f.get_tensor(name)
            except Exception:  # noqa: BLE001 - header accepted, tensor unreadable there (F6)
                out[name] = None
                continue
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            vals = None
            if t.dtype not in (torch.complex64,) and t.dtype != getattr(torch, "float4_e2m1fn_x2", None):
                vals = t.reshape(-1).to(torch.float32).numpy() if t.numel() else np.zeros(0, np.float32)
            out[name] = (tuple(t.shape), raw, vals)
    return True, out


def _same_f32(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical float32, except that any NaN matches any NaN (payloads are not a value)."""
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    keep = ~np.isnan(a)
    return bool(np.array_equal(a[keep].view(np.uint32), b[keep].view(np.uint32)))


def check(path: str) -> tuple[str, str]:
    ref_ok, ref = _reference(path)
    try:
        f = _core.SafetensorsFile(path)
        entries = {e["name"]: e for e in f.entries()}
        ck = Checkpoint.open(path)
    except (PysafeError, FileNotFoundError) as exc:
        problem = _message_problem(str(exc), path)
        if problem:
            return "exception", f"{type(exc).__name__}: {problem}: {str(exc)[:300]!r}"
        return ("stricter" if ref_ok else "both_reject"), getattr(exc, "code", type(exc).__name__)
    except BaseException as exc:  # noqa: BLE001 - exactly what the contract forbids
        return "exception", f"{type(exc).__name__}: {str(exc)[:300]!r}"
    if not ref_ok:
        return "lenient", f"pysafe accepted {len(entries)} tensors"
    if set(entries) != set(ref):
        return "mismatch", f"names differ: {sorted(set(entries) ^ set(ref))[:5]!r}"
    for name, e in entries.items():
        r = ref[name]
        try:
            buf = f.buffer(name).tobytes()
        except BaseException as exc:  # noqa: BLE001
            return "exception", f"buffer({name!r}): {type(exc).__name__}: {str(exc)[:200]!r}"
        if r is not None:
            shape, raw, vals = r
            if e["dtype"] == "F4":  # torch packs two per element: (..., n/2)
                shape = shape[:-1] + (shape[-1] * 2,) if shape else shape
            if tuple(e["shape"]) != shape:
                return "mismatch", f"{name!r}: shape {e['shape']} vs reference {shape}"
            if buf != raw:
                return "mismatch", f"{name!r}: bytes differ"
        else:
            vals = None
        # pysafe's upcast (the engine's read path) must work or refuse with its own error
        try:
            got = ck.read(name)
        except PysafeError as exc:
            problem = _message_problem(str(exc), path)
            if problem:
                return "exception", f"read({name!r}): {problem}: {str(exc)[:200]!r}"
            continue
        except BaseException as exc:  # noqa: BLE001
            return "exception", f"read({name!r}): {type(exc).__name__}: {str(exc)[:200]!r}"
        if vals is not None and e["dtype"] in _TORCH_FLOAT and e["dtype"] not in ("I64", "U64", "I32", "U32"):
            if not _same_f32(got.reshape(-1), vals):
                return "mismatch", f"{name!r}: upcast values differ from torch's ({e['dtype']})"
    return "both_accept", ""


"""One exception hierarchy for pysafe. Each class also subclasses the builtin users expect.

The native core raises these classes directly (registered in ``csrc/bindings/module.cpp``);
a core error carries a stable ``code`` attribute (for header errors, one per validation condition).
"""

from __future__ import annotations


class PysafeError(Exception):
    """Base class of every error pysafe raises on purpose."""

    code: str = "error"


class CheckpointError(PysafeError, ValueError):
    """A checkpoint cannot be read: no weights found, unreadable file, unsupported layout."""

    code = "checkpoint"


class HeaderError(CheckpointError):
    """A safetensors header is malformed (see docs/metrics.md); ``code`` names the condition."""

    code = "header"


class ShardIndexError(CheckpointError):
    """``model.safetensors.index.json`` is malformed or points to a missing shard."""

    code = "shard_index"


class TensorNotFoundError(PysafeError, KeyError):
    """A tensor name is not in a checkpoint; the message names the nearest keys."""

    code = "tensor_not_found"

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(PysafeError, ValueError):
    """Two tensors that should pair have different shapes (or checkpoints share nothing)."""

    code = "shape_mismatch"


class DeviceUnavailableError(PysafeError, RuntimeError):
    """A device (CUDA) was asked for that this build or machine does not have."""

    code = "device"


class ClusterError(PysafeError, RuntimeError):
    """``--ray``: Ray is not installed, the cluster cannot be reached, or its workers kept dying."""

    code = "cluster"


class InternalError(PysafeError, RuntimeError):
    """An invariant of pysafe itself failed: this is a pysafe bug."""

    code = "internal"


_INVISIBLE = {0x2028, 0x2029, 0x200E, 0x200F, 0x061C, 0xFEFF, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def printable(s: str) -> str:
    """``s`` made safe to echo in a one-line message, as the native core does it: control
    characters (C0, DEL, C1, line separators, bidi overrides) become ``\\uXXXX``, lone surrogates
    (undecodable bytes of a file name) ``\\udcXX``; nothing is dropped or cut."""
    out = []
    for c in s:
        o = ord(c)
        if o < 0x20 or 0x7F <= o <= 0x9F or o in _INVISIBLE or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


__all__ = [
    "printable",
    "PysafeError",
    "CheckpointError",
    "HeaderError",
    "ShardIndexError",
    "TensorNotFoundError",
    "ShapeMismatchError",
    "DeviceUnavailableError",
    "InternalError",
]

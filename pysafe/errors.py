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
    """A safetensors header is malformed (see engine.md §2); ``code`` names the condition."""

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


class InternalError(PysafeError, RuntimeError):
    """An invariant of pysafe itself failed: this is a pysafe bug."""

    code = "internal"


__all__ = [
    "PysafeError",
    "CheckpointError",
    "HeaderError",
    "ShardIndexError",
    "TensorNotFoundError",
    "ShapeMismatchError",
    "DeviceUnavailableError",
    "InternalError",
]

"""An HDF5 cache of pooled activation features, keyed by (checkpoint, inputs, hook, positions, window).

Every analysis asks :func:`cached` for the features it needs; a second analysis (or a second run) that
asks for the same key reads them instead of running the model. Keys are SHA-256 digests of

- the model: its parameters' bytes (lab models are a few MB), or for a HF checkpoint directory the names,
  sizes and modification times of its files;
- the inputs: the token arrays and EOT positions (lab), or the prompt texts (HF);
- the hook point, position selector and window.

Each entry is a dataset ``/features/<key>`` with the key's parts as attributes. Writes go through a
temporary file that replaces the cache whole, so an interrupted write never leaves a corrupt cache; new
entries are batched (:meth:`FeatureCache.flush`) so that the file is copied once per batch, not per entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def model_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_fingerprint(path) -> str:
    p = Path(path)
    items = []
    for f in sorted(p.iterdir() if p.is_dir() else [p]):
        if f.is_file():
            st = f.stat()
            items.append((f.name, st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def inputs_fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, (list, tuple)):
            h.update(json.dumps(list(a)).encode())
        else:
            a = np.ascontiguousarray(a)
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


class FeatureCache:
    """``cache = FeatureCache(path)``; ``cache.get_or_compute(parts, fn)`` returns ``fn()``'s array, stored
    under the digest of ``parts`` (a JSON-able dict) the first time and read back afterwards.

    New entries are held in memory and written together by :meth:`flush` (at the end of a ``with`` block,
    or once ``flush_bytes`` are pending): each write copies the file to a temporary one, so writing entry
    by entry would copy the whole cache once per entry.
    """

    def __init__(self, path, flush_bytes: int = 1 << 28):
        self.path = Path(path)
        self.flush_bytes = int(flush_bytes)
        self.pending: dict[str, tuple[dict, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, parts: dict):
        import h5py

        k = self.key(parts)
        if k in self.pending:
            return self.pending[k][1]
        if not self.path.exists():
            return None
        with h5py.File(self.path, "r") as f:
            if f"features/{k}" in f:
                return f[f"features/{k}"][...]
        return None

    def put(self, parts: dict, value: np.ndarray) -> None:
        self.pending[self.key(parts)] = (parts, np.asarray(value))
        if sum(v.nbytes for _, v in self.pending.values()) >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries: the file is copied, extended and renamed over the old one."""
        import shutil

        import h5py

        if not self.pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "a") as f:
            for k, (parts, value) in self.pending.items():
                if f"features/{k}" in f:
                    continue
                ds = f.create_dataset(f"features/{k}", data=value, compression="gzip", compression_opts=1)
                for name, v in parts.items():
                    ds.attrs[name] = json.dumps(v) if not isinstance(v, str) else v
        tmp.replace(self.path)
        self.pending.clear()

    def get_or_compute(self, parts: dict, fn) -> np.ndarray:
        got = self.get(parts)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        value = np.asarray(fn())
        self.put(parts, value)
        return value


def cached(cache: FeatureCache | None, parts: dict, fn):
    """``fn()`` through ``cache`` when there is one."""
    return fn() if cache is None else cache.get_or_compute(parts, fn)

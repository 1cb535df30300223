"""results.h5: one group per tensor; scalars as attributes, spectra (and vectors) as datasets.

Tensor names become HDF5 keys by :func:`h5_key`, a reversible percent-encoding: any name the
safetensors format allows ('.', the empty name, 'a/b' beside 'a', NUL, control characters, unicode)
gets its own group. Each group also keeps the original name in its ``name`` attribute, and the root
dataset ``tensor_keys`` lists the keys in the report's order. :func:`read_h5` reads a file back with
the original names.
"""

from __future__ import annotations

import errno
import json
import math
import os

import h5py
import numpy as np

from pysafe._version import __version__
from pysafe.records import ARRAYS, VECTORS

KEY_ENCODING = ("percent-encoded UTF-8: '%', '/', control characters and a leading '.' as %XX; "
                "the empty name as '%'")


def _must_encode(i: int, ch: str) -> bool:
    o = ord(ch)
    return ch in "%/" or o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF or (i == 0 and ch == ".")


def h5_key(name: str) -> str:
    """The HDF5 link name of tensor ``name`` (reversible: :func:`h5_name`)."""
    if name == "":
        return "%"
    return "".join("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) if _must_encode(i, ch) else ch
                   for i, ch in enumerate(name))


def h5_name(key: str) -> str:
    """The tensor name of HDF5 link name ``key`` (inverse of :func:`h5_key`)."""
    if key == "%":
        return ""
    out, raw, i = [], bytearray(), 0
    while i < len(key):
        if key[i] == "%":
            raw.append(int(key[i + 1:i + 3], 16))
            i += 3
            continue
        if raw:
            out.append(raw.decode("utf-8", "surrogatepass"))
            raw = bytearray()
        out.append(key[i])
        i += 1
    if raw:
        out.append(raw.decode("utf-8", "surrogatepass"))
    return "".join(out)


def _text(v: str) -> str:
    """A free-text attribute value: HDF5 strings end at NUL, so NUL is written as the escape \\x00."""
    return v.replace("\0", "\\x00")


def _name_attr(name: str):
    """The original name as an attribute value: a string, or its UTF-8 bytes (opaque) when it holds NUL."""
    return name if "\0" not in name and not any(0xD800 <= ord(c) <= 0xDFFF for c in name) else \
        np.void(name.encode("utf-8", "surrogatepass"))


class _Sink:
    """The file h5py writes through: real writes until the first one fails, then the rest in memory.

    HDF5 must never see a failed write: on a full disk it then keeps dirty metadata and crashes in
    its exit handler. So the error is kept here, HDF5 finishes against memory, and :func:`write_h5`
    raises the error once the file is closed.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.pos = 0
        self.error: OSError | None = None
        self.overlay: list[tuple[int, bytes]] = []

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = OSError(exc.errno, exc.strerror, self.path)

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self._size() + pos
        return self.pos

    def tell(self):
        return self.pos

    def _size(self):
        size = os.fstat(self.fd).st_size
        return max([size] + [o + len(b) for o, b in self.overlay])

    def write(self, b):
        b = bytes(b)
        if self.error is None:
            try:
                done = 0
                while done < len(b):
                    n = os.pwrite(self.fd, b[done:], self.pos + done)
                    if n == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += n
            except OSError as exc:
                self._fail(exc)
        if self.error is not None:
            self.overlay.append((self.pos, b))
        self.pos += len(b)
        return len(b)

    def read(self, n=-1):
        if n is None or n < 0:
            n = max(0, self._size() - self.pos)
        buf = bytearray(os.pread(self.fd, n, self.pos))
        for o, b in self.overlay:  # writes kept in memory, newest last
            lo, hi = max(o, self.pos), min(o + len(b), self.pos + n)
            if lo < hi:
                if len(buf) < hi - self.pos:
                    buf.extend(b"\0" * (hi - self.pos - len(buf)))
                buf[lo - self.pos:hi - self.pos] = b[lo - o:hi - o]
        self.pos += len(buf)
        return bytes(buf)

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def truncate(self, size=None):
        if self.error is None:
            try:
                os.ftruncate(self.fd, self.pos if size is None else size)
            except OSError as exc:
                self._fail(exc)
        return self.pos if size is None else size

    def flush(self):
        pass

    def close(self):
        os.close(self.fd)


class _WriteFailed(Exception):
    pass


def write_h5(cmp, path: str | os.PathLike, run_id: str | None = None) -> None:
    """Write ``cmp`` to ``path``; an ``OSError`` (naming ``path``) if the disk refuses, never a crash."""
    sink = _Sink(path)
    try:
        with h5py.File(sink, "w") as f:
            try:
                _fill(f, cmp, run_id, sink)
            except _WriteFailed:
                pass
    finally:
        sink.close()
    if sink.error is not None:
        raise sink.error


def _fill(f, cmp, run_id, sink) -> None:
    f.attrs["pysafe_version"] = __version__
    if run_id is not None:
        f.attrs["run_id"] = run_id
    f.attrs["base"] = json.dumps(cmp.base)
    f.attrs["tuned"] = json.dumps(cmp.tuned)
    f.attrs["params"] = json.dumps(cmp.params)
    f.attrs["key_encoding"] = KEY_ENCODING
    keys = [h5_key(rec["name"]) for rec in cmp.records]
    f.create_dataset("tensor_keys", data=np.array(keys, dtype=h5py.string_dtype()))
    tensors = f.create_group("tensors")
    for key, rec in zip(keys, cmp.records):
        if sink.error is not None:
            raise _WriteFailed
        g = tensors.create_group(key)
        for k, v in rec.items():
            if k == "name":
                g.attrs["name"] = _name_attr(v)
            elif k in ARRAYS:
                g.create_dataset(k, data=np.asarray(v, dtype=np.float64))
            elif k == VECTORS:
                for vn, arr in v.items():
                    arr = np.asarray(arr, dtype=np.float32)
                    chunks = (min(arr.shape[0], 4096), max(1, min(arr.shape[1], 64))) if arr.size else None
                    g.create_dataset(vn, data=arr, chunks=chunks)
            elif v is None:
                g.attrs[k] = "null"
            elif isinstance(v, str):
                g.attrs[k] = _text(v)
            elif isinstance(v, (list, tuple)):
                g.attrs[k] = np.asarray(v)
            elif isinstance(v, float) and not math.isfinite(v):
                g.attrs[k] = np.nan
            else:
                g.attrs[k] = v
    sk = f.create_group("skipped")
    for s in cmp.skipped:
        g = sk.create_group(h5_key(s["name"]))
        g.attrs["name"] = _name_attr(s["name"])
        g.attrs["reason"] = _text(str(s["reason"]))


def _attr(v):
    if isinstance(v, np.void):
        return bytes(v).decode("utf-8", "surrogatepass")
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogatepass")
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_h5(path: str | os.PathLike) -> dict:
    """Read a results.h5 back: ``{"attrs", "tensors": {name: {...}}, "skipped": {name: reason}}``.

    Tensor names are the originals (decoded from the keys), in the report's order; each tensor's
    entry holds its attributes (``"null"`` back to None) and its datasets as NumPy arrays.
    """
    with h5py.File(path, "r") as f:
        out = {"attrs": {k: _attr(v) for k, v in f.attrs.items()}, "tensors": {}, "skipped": {}}
        keys = [k.decode() if isinstance(k, bytes) else k for k in f["tensor_keys"][()]] \
            if "tensor_keys" in f else list(f["tensors"])
        for key in keys:
            g = f["tensors"][key]
            name = h5_name(key)
            rec = {k: (None if isinstance(v, str) and v == "null" else _attr(v)) for k, v in g.attrs.items()}
            if rec.get("name", name) != name:
                raise ValueError(f"{path}: group {key!r} decodes to {name!r} but its name attribute is "
                                 f"{rec['name']!r}")
            rec["name"] = name
            for k, ds in g.items():
                rec[k] = ds[()]
            out["tensors"][name] = rec
        for key, g in f["skipped"].items() if "skipped" in f else ():
            out["skipped"][h5_name(key)] = _attr(g.attrs["reason"])
    return out

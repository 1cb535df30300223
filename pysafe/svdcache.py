"""On-disk cache of W_base's decomposition, reused when several fine-tunes are compared against one base.

Each entry is W_base's truncated SVD as the metrics use it (the k kept singular vectors and every computed
singular value) for one tensor of one base file under one set of options. A second ``pysafe analyze`` against
the same base reads it instead of computing the base SVD; its records are identical to those of an uncached
run (the core computes ΔW's SVD under the same thread layout either way).

Key (SHA-256 of): the base file's identity (resolved path, device, inode, size, mtime_ns, ctime_ns), the
checkpoint's header digest, the tensor's name, dtype, shape and data offset, a digest of 17 sampled 4 KiB
windows of the tensor's bytes, every base SVD option the core exposes (rank, energy, max rank, oversampling,
power iterations, seed, exact, ... and any option added later), ``center``, ``transpose``, the precision,
the core's path (dense or factored) and thread count (the base SVD's rounding depends on both), pysafe's
version, this format's schema number and the compiled core's size and mtime.

Trade-off: hashing every byte of a 13 GB base would cost about as long as the analysis itself, so the key
relies on the file's identity instead. Rewriting a file in any usual way (save, copy, download, ``git
checkout``) changes its mtime/ctime or inode and so misses the cache; ctime cannot be set back by a user.
The sampled windows additionally catch a same-size in-place rewrite of the sampled pages. A change that keeps
inode, size, mtime *and* ctime (only possible below the file system) would go unnoticed.

Entries are ``.npz`` files (NumPy's zip of raw arrays, read with ``allow_pickle=False``: nothing is
unpickled) with a JSON metadata array that repeats the key and a BLAKE2 digest of the arrays. Writes go to a
temporary file in the same directory, then ``os.replace``: concurrent writers of one entry each leave a
complete file (the last rename wins), and readers never see a partial one. Unreadable, truncated, mismatched
or stale entries are ignored (a note in :attr:`BaseCache.notes`, a ``logging`` debug message) and replaced
by the next write; the cache never makes an analysis fail. After each comparison the directory is pruned to
``max_bytes`` by least recent use (a hit refreshes an entry's mtime); temporary files of interrupted writers
older than an hour are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pysafe._loader import _core
from pysafe._version import __version__

log = logging.getLogger("pysafe.cache")

#: bumped whenever the entry layout or the meaning of a stored field changes
SCHEMA = 1
#: default size bound of the cache directory (override with PYSAFE_CACHE_MAX_GB or ``max_bytes``)
DEFAULT_MAX_BYTES = 16 << 30
_SAMPLES = 16
_WINDOW = 4096
#: fields every entry has (the core may return more; they are stored and handed back as they are)
_FIELDS = ("rows", "cols", "k", "f64", "method", "full_spectrum", "energy_reached", "fro2", "rel_error",
           "tail_rel", "sketch_passes")


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/pysafe`` (``~/.cache/pysafe`` when unset)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "pysafe"
    try:
        return Path.home() / ".cache" / "pysafe"
    except (RuntimeError, KeyError):  # no home directory (a bare container user)
        return Path(tempfile.gettempdir()) / f"pysafe-cache-{os.getuid()}"


def _core_build_id() -> list:
    try:
        st = os.stat(_core.__file__)
        return [os.path.basename(_core.__file__), st.st_size, st.st_mtime_ns]
    except (AttributeError, OSError):
        return ["unknown"]


def svd_options_dict(o) -> dict:
    """Every public field of a ``_core.SvdOptions`` (so options added to the core later enter the key)."""
    out = {}
    for name in dir(o):
        if name.startswith("_"):
            continue
        v = getattr(o, name)
        if name == "device" and v < 0:  # the CPU: the keys that builds without a GPU backend wrote stay valid
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[name] = v
    return out


def sample_digest(buf) -> str:
    """BLAKE2 digest of the size and of 17 evenly spaced 4 KiB windows of a tensor's bytes."""
    a = np.asarray(buf).reshape(-1).view(np.uint8)
    n = a.size
    h = hashlib.blake2b(str(n).encode(), digest_size=16)
    if n <= (_SAMPLES + 1) * _WINDOW:
        h.update(a.tobytes())
    else:
        step = (n - _WINDOW) // _SAMPLES
        for i in range(_SAMPLES + 1):
            o = min(i * step, n - _WINDOW)
            h.update(a[o:o + _WINDOW].tobytes())
    return h.hexdigest()


def _arrays_digest(arrays: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        x = arrays[name]
        h.update(name.encode() + str(x.dtype).encode() + str(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


class BaseCache:
    """A directory of W_base decompositions. ``BaseCache(path)``; ``BaseCache(None)`` uses :func:`default_dir`."""

    def __init__(self, path=None, max_bytes: int | None = None):
        root = Path(path) if path is not None else default_dir()
        self.dir = root / f"base-svd-v{SCHEMA}"
        if max_bytes is None:
            env = os.environ.get("PYSAFE_CACHE_MAX_GB")
            try:
                max_bytes = int(float(env) * (1 << 30)) if env else DEFAULT_MAX_BYTES
            except ValueError:
                max_bytes = DEFAULT_MAX_BYTES
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.notes: list[str] = []

    # -- notes ------------------------------------------------------------------------------------------------
    def note(self, msg: str) -> None:
        """Record why an entry was not used or stored (shown by the CLI with --debug)."""
        self.notes.append(msg)
        log.debug(msg)

    def summary(self, since: dict | None = None) -> dict:
        """Counts of hits, misses, writes and notes (those since an earlier ``summary()`` when given)."""
        out = {"dir": str(self.dir), "hits": self.hits, "misses": self.misses, "writes": self.writes,
               "notes": len(self.notes)}
        if since is not None:
            for k in ("hits", "misses", "writes", "notes"):
                out[k] -= since[k]
        return out

    # -- keys -------------------------------------------------------------------------------------------------
    @staticmethod
    def _file_identity(file: str) -> list:
        # stat'ed for every key (microseconds beside an SVD): a file rewritten while this cache object
        # lives, e.g. between two compare() calls of one Python session, must miss
        real = os.path.realpath(file)
        st = os.stat(real)
        return [real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def key(self, ckpt, name: str, buf, params, f64: bool, path: str = "dense") -> str | None:
        """The entry key of tensor ``name`` of checkpoint ``ckpt`` (``buf``: its raw bytes) analysed with
        ``params`` (a ``_core.AnalyzeParams``) on the core's ``path`` ("dense" or "factored"); None (no
        caching) when the file cannot be identified.

        The path and the core's thread count enter the key because the base SVD runs with another BLAS
        thread layout on each, and blocked reductions round differently: an entry is only reused where
        recomputing it would give the same bits."""
        info = ckpt.tensors[name]
        try:
            ident = self._file_identity(info.file)
        except OSError as exc:
            self.note(f"{info.file}: not cached ({exc})")
            return None
        parts = {"schema": SCHEMA, "version": __version__, "core": _core_build_id(), "file": ident,
                 "header_digest": ckpt.header_digest, "tensor": name, "dtype": info.dtype,
                 "shape": list(info.shape), "offset": info.offset, "sample": sample_digest(buf),
                 "base_svd": svd_options_dict(params.base), "center": bool(params.center),
                 "transpose": bool(params.transpose), "f64": bool(f64), "path": path,
                 "threads": _core.get_num_threads()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    # -- read -------------------------------------------------------------------------------------------------
    def load(self, key: str | None, rows: int, cols: int, f64: bool) -> dict | None:
        """The stored decomposition for ``key`` if a valid one exists (else None, counted as a miss)."""
        if key is None:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {name: z[name] for name in z.files if name != "meta"}
            problem = self._check(meta, key, arrays, rows, cols, f64)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged entry of any kind is a miss, never a failure
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem:
            self.note(f"{path}: ignored, {problem}")
            self.misses += 1
            return None
        try:
            os.utime(path)  # least-recently-used pruning goes by mtime
        except OSError:
            pass
        self.hits += 1
        d = dict(meta["fields"])
        d.update(arrays)
        return d

    @staticmethod
    def _check(meta, key, arrays, rows, cols, f64) -> str | None:
        if meta.get("schema") != SCHEMA or meta.get("key") != key:
            return "schema or key does not match"
        fields = meta.get("fields")
        if not isinstance(fields, dict) or any(f not in fields for f in _FIELDS):
            return "metadata incomplete"
        if any(n not in arrays for n in ("U", "S", "Vt")):
            return "arrays U, S, Vt missing"
        U, S, Vt = arrays["U"], arrays["S"], arrays["Vt"]
        want = np.float64 if f64 else np.float32
        k = fields["k"]
        if (fields["rows"], fields["cols"], bool(fields["f64"])) != (rows, cols, bool(f64)):
            return f"holds a {fields['rows']}x{fields['cols']} f{64 if fields['f64'] else 32} matrix, " \
                   f"expected {rows}x{cols} f{64 if f64 else 32}"
        if U.dtype != want or S.dtype != want or Vt.dtype != want:
            return f"arrays are {U.dtype}/{S.dtype}/{Vt.dtype}, expected {np.dtype(want)}"
        if U.shape != (rows, k) or Vt.shape != (k, cols) or S.ndim != 1 or not (k <= S.size <= min(rows, cols)):
            return f"array shapes U {U.shape}, S {S.shape}, Vt {Vt.shape} do not fit k = {k}"
        if _arrays_digest(arrays) != meta.get("digest"):
            return "array digest does not match (damaged file)"
        return None

    # -- write ------------------------------------------------------------------------------------------------
    def store(self, key: str | None, d: dict | None, tensor: str = "") -> None:
        """Write a decomposition returned by the core (atomically; errors become notes)."""
        if key is None or d is None:
            return
        # Every array of the core's dict is stored as an .npz member and every other value in the JSON
        # metadata, so that fields the core adds later round-trip without a change here.
        arrays = {n: np.ascontiguousarray(v) for n, v in d.items() if isinstance(v, np.ndarray)}
        fields = {n: v for n, v in d.items() if not isinstance(v, np.ndarray)}
        if any(n == "meta" or not n.isidentifier() for n in arrays):
            self.note(f"{tensor}: unexpected array names {sorted(arrays)}; not stored")
            return
        size = sum(a.nbytes for a in arrays.values())
        if size > self.max_bytes:
            self.note(f"{tensor}: decomposition of {size / 1e6:.0f} MB exceeds the cache bound; not stored")
            return
        meta = {"schema": SCHEMA, "key": key, "tensor": tensor, "fields": fields, "digest": _arrays_digest(arrays),
                "created": time.time()}
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.dir)
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
            os.replace(tmp, self._path(key))
            tmp = None
            self.writes += 1
        except OSError as exc:
            self.note(f"{self.dir}: could not store {tensor or key} ({exc})")
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    # -- size bound -------------------------------------------------------------------------------------------
    def prune(self, stale_tmp_seconds: float = 3600.0) -> int:
        """Delete least recently used entries until the directory holds at most ``max_bytes``, and temporary
        files older than ``stale_tmp_seconds``. Returns the number of files removed."""
        removed = 0
        entries = []
        now = time.time()
        try:
            it = list(os.scandir(self.dir))
        except OSError:
            return 0
        for e in it:
            try:
                st = e.stat()
            except OSError:  # removed meanwhile by another process
                continue
            if e.name.startswith(".tmp-"):
                if now - st.st_mtime > stale_tmp_seconds:
                    removed += self._unlink(e.path)
            elif e.name.endswith(".npz"):
                entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(s for _, s, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            removed += self._unlink(path)
            total -= size
        return removed

    @staticmethod
    def _unlink(path) -> int:
        try:
            os.unlink(path)
            return 1
        except OSError:
            return 0


def open_cache(cache) -> BaseCache | None:
    """``compare(cache=...)``: None/False -> no cache, True -> the default directory, a path -> that
    directory, a :class:`BaseCache` -> itself."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, BaseCache):
        return cache
    if cache is True:
        return BaseCache()
    return BaseCache(cache)

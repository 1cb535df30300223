"""``--ray ADDRESS``: a comparison or a trajectory spread over the workers of a Ray cluster.

A pair is split into one task per tensor group (the tensors of one layer; the ones outside any layer form
one more group); a trajectory into one task per checkpoint. Each task opens the checkpoints itself, by
absolute path (the cluster's machines must see the files at the same paths, e.g. on a shared file
system), and sends back only records. Every tensor's numbers depend on its data, its name, the options and
the thread count alone, and each task runs with the thread count the local run would use, so the records
are those of the local run, in the same order, bit for bit.

``ADDRESS`` is ``local`` or ``local:N`` (start a private cluster of N worker processes on this machine for
the length of the call; N defaults to the number of cores), or the address of a running cluster (``auto``,
``HOST:PORT``, ``ray://HOST:PORT``). Tasks are retried (``MAX_RETRIES``) when their worker process dies.
Ray is imported only here, and only when one of these functions is called.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path

from pysafe._loader import _core
from pysafe.checkpoint import Checkpoint, PeftAdapter, detect_scheme, name_info
from pysafe.errors import CheckpointError, ClusterError
from pysafe.svdcache import BaseCache
from pysafe.weights import (Comparison, Options, adapter_preflight, analyze_pairs, analyze_targets, compare,
                            preflight, preflight_skips)

#: how often a task whose worker process died is started again
MAX_RETRIES = 3
#: object store of a private local cluster: records are small, so keep it far below Ray's default (30% of RAM)
_LOCAL_OBJECT_STORE = 256 << 20
#: fault injection for the tests: the first task that finds this file missing creates it and kills its own
#: worker process (so that the retry is exercised by a real worker death)
FAULT_ENV = "PYSAFE_RAY_KILL_ONE_WORKER"
MISSING = 'the --ray option needs Ray, which is not installed: pip install "pysafe[ray]"'


def parse_address(address: str) -> tuple[str, int | None]:
    """``("local", N)`` for ``local``/``local:N``, else ``("connect", None)``; ValueError for a bad N."""
    a = address.strip()
    if a == "local":
        return "local", os.cpu_count() or 1
    m = re.fullmatch(r"local:(\S*)", a)
    if m:
        if not m.group(1).isdigit() or int(m.group(1)) < 1:
            raise ValueError(f"ray address {address!r}: local:N needs a number of workers N >= 1")
        return "local", int(m.group(1))
    if not a:
        raise ValueError("ray address is empty: use local, local:N, auto, HOST:PORT or ray://HOST:PORT")
    return "connect", None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(MISSING) from None
    return ray


def check_available(address: str) -> None:
    """Fail early, in one line, on a malformed ``address`` or a missing Ray (without importing it)."""
    import importlib.util

    parse_address(address)
    if importlib.util.find_spec("ray") is None:
        raise ClusterError(MISSING)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when HOST:PORT does not answer (Ray itself would retry for minutes)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if not m:
        return  # "auto" and other forms: Ray resolves them and fails fast on its own
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is `ray start "
                           f"--head` running there, and is the port open?") from None


@contextlib.contextmanager
def cluster(address: str):
    """Ray, connected to ``address`` for the length of the block (a private local cluster is shut down at the
    end; a connection this process already had is reused and left open)."""
    kind, n = parse_address(address)
    ray = _import_ray()
    if kind == "connect":
        _check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if kind == "local":
        ray.init(num_cpus=n, object_store_memory=_LOCAL_OBJECT_STORE, **quiet)
    else:
        try:
            ray.init(address=address.strip(), **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: "
                               f"{' '.join(str(exc).split())[:300]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _fault_point() -> None:
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def _resolved_threads(threads: int) -> int:
    """The thread count a local run with ``threads`` (0: all cores) uses on this machine."""
    before = _core.get_num_threads()
    _core.set_num_threads(threads)
    n = _core.get_num_threads()
    _core.set_num_threads(before)
    return n


def _task_options(opts: Options) -> dict:
    """The options each task runs with: the caller's, with the thread count a local run would use here."""
    if opts.device != "cpu":
        raise ValueError(f"device {opts.device!r} with --ray: the tasks run the SVDs on the workers' CPUs "
                         "(a GPU per task is not supported); drop --device or --ray")
    return {**asdict(opts), "threads": _resolved_threads(opts.threads)}


def _open_cache(cache_root, max_bytes):
    return BaseCache(cache_root, max_bytes=max_bytes) if cache_root is not None else None


def _cache_args(bc: BaseCache | None):
    return (str(Path(bc.dir).parent.resolve()), bc.max_bytes) if bc is not None else (None, None)


def _group_task(base: str, tuned: str, names: list, options: dict, scheme: str, cache_root, max_bytes) -> dict:
    """One Ray task of a pair: the records of ``names`` (one tensor group)."""
    _fault_point()
    opts = Options(**options)
    cache = _open_cache(cache_root, max_bytes)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    before = _core.get_num_threads()
    _core.set_num_threads(opts.threads)
    try:
        run = analyze_targets if isinstance(t, PeftAdapter) else analyze_pairs
        records, skipped, nbytes = run(b, t, names, opts, scheme, None, cache)
    finally:
        _core.set_num_threads(before)
        b.close()
        t.close()
    return {"records": records, "skipped": skipped, "bytes": nbytes,
            "cache": cache.summary() if cache is not None else None, "notes": cache.notes if cache else []}


def _checkpoint_task(base: str, tuned: str, options: dict, cache_root, max_bytes) -> tuple[Comparison, list]:
    """One Ray task of a trajectory: the whole comparison of one checkpoint with the base, and the cache's notes."""
    _fault_point()
    cache = _open_cache(cache_root, max_bytes)
    return compare(base, tuned, cache=cache, **options), cache.notes if cache is not None else []


def _groups(names: list[str], scheme: str) -> list[list[str]]:
    """The tensors of each layer (in the order of ``names``), then those outside any layer."""
    by: dict = {}
    for n in names:
        by.setdefault(name_info(n, scheme).layer, []).append(n)
    return [by[k] for k in sorted((k for k in by if k is not None))] + ([by[None]] if None in by else [])


def _get(ray, ref, what: str):
    """``ray.get`` with the task's own exception re-raised (one line at the CLI); a worker that could not
    import pysafe, or that kept dying, is a :class:`ClusterError` naming the task."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception) and "failed to import on the worker" in str(cause):
            raise ClusterError(f"{what}: the Ray workers cannot import pysafe; install the same pysafe on every "
                               "machine of the cluster (a local cluster's workers also search the current "
                               "directory first: a pysafe source tree there without a built core shadows the "
                               "installed package, so run from another directory)") from None
        if isinstance(cause, Exception):
            raise cause from None
        raise ClusterError(f"{what}: {' '.join(str(exc).split())[:300]}") from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
        raise ClusterError(f"{what}: the worker died {MAX_RETRIES + 1} times ({type(exc).__name__}); see the "
                           "Ray logs of the cluster") from None
    except ray.exceptions.RayError as exc:  # out of memory, a lost object, a cancelled task ...
        raise ClusterError(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def _wait_all(ray, refs: dict, on_done, what) -> dict:
    """Results of ``{ref: key}`` as they finish; ``on_done(key, result)`` after each; ``what(key)`` names a
    task in errors."""
    out, pending = {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for r in ready:
            res = _get(ray, r, what(refs[r]))
            out[refs[r]] = res
            on_done(refs[r], res)
    return out


def _absolute(p) -> str:
    return p.path if isinstance(p, (Checkpoint, PeftAdapter)) else os.path.abspath(os.fspath(p))


def compare_on_ray(base, tuned, address: str, *, progress=None, on_preflight=None, cache=None,
                   **options) -> Comparison:
    """:func:`pysafe.compare` with one Ray task per tensor group (see the module's doc). Same arguments, plus
    ``address``; the records equal the local run's. ``cache``: None/False, True, a directory, or a
    :class:`~pysafe.svdcache.BaseCache` (its directory is what the workers use).

    Raises:
        ClusterError: Ray is missing, the address cannot be reached, or a worker kept dying.
        and whatever :func:`pysafe.compare` raises (from the task that met it).
    """
    from pysafe.svdcache import open_cache

    opts = Options(**options)
    opts.validate()
    run_opts = _task_options(opts)
    base, tuned = _absolute(base), _absolute(tuned)
    bc = open_cache(cache)
    t0 = time.perf_counter()
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    try:
        if isinstance(b, PeftAdapter):
            raise CheckpointError(f"{b.path}: BASE is a PEFT adapter; pass the base model as BASE and the adapter "
                                  "as TUNED")
        scheme = detect_scheme(b.tensors)
        if isinstance(t, PeftAdapter):
            pre, skipped = adapter_preflight(b, t, opts, scheme)
            sizes = {n: b.tensors[n].nbytes for n in pre.pairs}
        else:
            pre = preflight(b, t, opts)
            skipped = preflight_skips(pre)
            sizes = {n: b.tensors[n].nbytes + t.tensors[n].nbytes for n in pre.pairs}
        if on_preflight:
            on_preflight(pre)
        base_info, tuned_info = b.describe(), t.describe()
    finally:
        b.close()
        t.close()
    groups = _groups(pre.pairs, scheme)
    root, max_bytes = _cache_args(bc)
    done = {"n": 0, "bytes": 0}
    total = sum(sizes.values())

    def tick(i, res):
        done["n"] += len(groups[i])
        done["bytes"] += sum(sizes[n] for n in groups[i])
        if progress:
            progress(done["n"], len(pre.pairs), done["bytes"], total, groups[i][-1])

    with cluster(address) as ray:
        task = ray.remote(_group_task).options(max_retries=MAX_RETRIES, num_cpus=1)
        refs = {task.remote(base, tuned, g, run_opts, scheme, root, max_bytes): i for i, g in enumerate(groups)}
        results = _wait_all(ray, refs, tick, lambda i: f"tensors {groups[i][0]} .. {groups[i][-1]}")
    order = {n: i for i, n in enumerate(pre.pairs)}
    records = sorted((r for res in results.values() for r in res["records"]), key=lambda r: order[r["name"]])
    skipped += sorted((s for res in results.values() for s in res["skipped"]), key=lambda s: order[s["name"]])
    cache_summary = None
    if bc is not None:
        before = bc.summary()
        for res in results.values():
            _count(bc, res["cache"], res["notes"])
        bc.prune()
        cache_summary = bc.summary(since=before)
    return Comparison(base=base_info, tuned=tuned_info, params=asdict(opts), records=records, skipped=skipped,
                      preflight=pre, scheme=scheme, seconds=time.perf_counter() - t0,
                      bytes_read=sum(res["bytes"] for res in results.values()), cache=cache_summary)


def compare_many_on_ray(base, tuned: list, address: str, *, cache=None, progress=None, **options) -> list[Comparison]:
    """One :func:`pysafe.compare` per checkpoint of ``tuned``, one Ray task each, in the order given. With a
    cache, the first checkpoint runs alone and fills it, so that the others read W_base's decompositions
    instead of computing them side by side. ``progress(done, total, index)`` after each checkpoint (``index``
    into ``tuned``)."""
    from pysafe.svdcache import open_cache

    opts = Options(**options)
    opts.validate()
    run_opts = _task_options(opts)
    bc = open_cache(cache)
    root, max_bytes = _cache_args(bc)
    base = _absolute(base)
    paths = [_absolute(p) for p in tuned]
    out: dict[int, tuple] = {}

    def tick(i, res):
        out[i] = res
        if progress:
            progress(len(out), len(paths), i)

    with cluster(address) as ray:
        task = ray.remote(_checkpoint_task).options(max_retries=MAX_RETRIES, num_cpus=1)
        first = 1 if bc is not None and len(paths) > 1 else 0
        for batch in (range(first), range(first, len(paths))):
            refs = {task.remote(base, paths[i], run_opts, root, max_bytes): i for i in batch}
            _wait_all(ray, refs, tick, lambda i: paths[i])
    cmps = []
    for i in range(len(paths)):
        c, notes = out[i]
        c.params = asdict(opts)  # the options as given (the tasks ran with the thread count resolved)
        if bc is not None:
            _count(bc, c.cache, notes)
        cmps.append(c)
    return cmps


def _count(bc: BaseCache, summary: dict | None, notes: list) -> None:
    """Add a task's cache counts (and notes) to the driver's cache object, whose summary the caller reports."""
    if summary:
        bc.hits += summary["hits"]
        bc.misses += summary["misses"]
        bc.writes += summary["writes"]
    bc.notes.extend(notes)


__all__ = ["compare_on_ray", "compare_many_on_ray", "cluster", "parse_address", "check_available", "MAX_RETRIES"]

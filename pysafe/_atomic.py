"""Write outputs whole, or not at all: pysafe's one place for atomic directories and JSON files.

:func:`replace_dir` writes a directory pysafe owns entirely (a checkpoint, a test-set cache);
:func:`write_json` writes one strict-JSON file; :func:`atomic_dir` writes a user's output folder:

it hands out a hidden staging directory beside the target, ``.OUT.pysafe-tmp-RUN``.
The command writes everything into it; at the end the stage gets a manifest of the files pysafe wrote
(``.pysafe-manifest.json``), the user's own files from the old directory are hard-linked (or copied)
into it, and it takes the target's place by one rename. So the target always holds a complete old
directory, a complete new one, or (when there was none before) nothing.

The rules, as the user sees them (docs/report-directory.md):

* a non-empty target is refused unless ``overwrite``;
* with ``overwrite``, the files pysafe wrote there before (listed in its manifest) are replaced or
  dropped; every other file is kept, also inside pysafe's folders; a file of the user's at a path pysafe
  writes is an error, never overwritten;
* staging and backup directories of a pysafe run that died (SIGKILL, power loss) are recognised by
  name, by the manifest inside and by their owner process being gone, and the next run over the same
  target cleans them up, or restores the old directory when the run died between two renames.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import stat
import uuid
from pathlib import Path

MANIFEST = ".pysafe-manifest.json"
FORMAT = "pysafe-output-manifest"
_TMP, _OLD = "tmp", "old"


class OutDirError(OSError):
    """The output directory cannot be written; the message names it, the failure and the errno."""

    def __init__(self, what: str, path, problem: str, err: int | None = None):
        super().__init__(err or 0, problem)
        self.message = f"{what} {path}: {problem}"
        if err:
            self.message += f" (errno {err}, {errno.errorcode.get(err, '?')})"

    def __str__(self) -> str:
        return self.message


def _describe(exc: OSError, root: Path, doing: str) -> str:
    """``exc`` as '{doing} FILE failed: STRERROR', the file relative to ``root`` where it is inside it."""
    text = exc.strerror or str(exc)
    if exc.filename:
        f = Path(os.fsdecode(exc.filename))
        try:
            f = f.relative_to(root)
        except ValueError:
            pass
        return f"{doing} {f} failed: {text}"
    return f"{doing} failed: {text}"


# -- processes and names --------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` (a manifest) may still run. Unknown counts as alive."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine (a shared file system): we cannot know
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    if not _pid_alive(pid):
        return False
    st = owner.get("start_time")
    return st is None or _start_time(pid) in (None, st)


def _sibling_re(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.pysafe-(?P<kind>{_TMP}|{_OLD})-(?P<run>(?P<pid>\d+)-[0-9a-f]{{12}})")


def _sibling(out: Path, kind: str, run_id: str) -> Path:
    return out.parent / f".{out.name}.pysafe-{kind}-{run_id}"


def read_manifest(d: Path) -> dict | None:
    try:
        m = json.loads((Path(d) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _write_manifest(d: Path, m: dict) -> None:
    tmp = d / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(m, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)


# -- ownership: which files of a directory pysafe wrote ---------------------------------------------
def _legacy_owned(d: Path) -> set[str]:
    """Files of a report written before manifests existed: a summary.json with pysafe's keys marks it."""
    try:
        s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(s, dict) and "pysafe_version" in s and "matrices" in s):
        return set()
    owned = {"summary.json", "results.h5"}
    try:  # a report page of pysafe's says so in its head
        if '<meta name=generator content="pysafe">' in (d / "index.html").read_text(encoding="utf-8")[:2000]:
            owned.add("index.html")
    except (OSError, ValueError):
        pass
    for p in (d / "plots").glob("*.png"):
        if p.name == "sv_decay.png" or p.name.startswith("heatmap_"):
            owned.add(f"plots/{p.name}")
    for p in (d / "activations").glob("*"):
        if re.fullmatch(r"(clusters_(base|tuned)|rowspace)\.(json|png)", p.name):
            owned.add(f"activations/{p.name}")
    return owned


def owned_files(d: Path) -> set[str]:
    """Relative paths of the files in ``d`` that pysafe wrote (its manifest, or a legacy report's names)."""
    m = read_manifest(d)
    if m is not None:
        return {str(f) for f in m.get("files", [])} | {MANIFEST}
    return _legacy_owned(d)


def _foreign(d: Path, owned: set[str]):
    """(relative path, is_dir) of everything in ``d`` that pysafe did not write, parents before children.

    A directory is pysafe's when it holds a file of pysafe's; its other contents are still the user's.
    """
    owned_dirs = {str(Path(f).parent) for f in owned}
    owned_dirs |= {str(p) for f in owned for p in Path(f).parents}
    for root, dirs, files in os.walk(d):
        rel_root = Path(root).relative_to(d)
        for name in sorted(dirs):
            rel = rel_root / name
            if os.path.islink(Path(root) / name):  # a link to a folder is a file here: kept, never followed
                files.append(name)
            elif str(rel) not in owned_dirs:
                yield str(rel), True
        dirs[:] = sorted(n for n in dirs if not os.path.islink(Path(root) / n))
        for name in sorted(files):
            rel = str(rel_root / name)
            if rel not in owned and not rel.endswith(MANIFEST + ".tmp"):
                yield rel, False


def _carry(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst`` (a copy where links fail; a symlink is recreated as one)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    mode = src.lstat().st_mode
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file, folder or symbolic link: cannot keep it", str(src))
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- the swap ---------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if os.environ.get("PYSAFE_NO_RENAME_EXCHANGE"):  # tests cover the fallback with it
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(new: Path, out: Path, backup: Path, on_first=None) -> Path:
    """Put the directory ``new`` at the existing directory ``out``; returns where the old one now is.

    One ``renameat2(RENAME_EXCHANGE)`` where the system has it (the old directory lands at ``new``), else
    ``out`` -> ``backup`` and ``new`` -> ``out`` (``on_first()`` runs between the two renames).
    """
    if _exchange(new, out):
        return new
    os.rename(out, backup)
    if on_first is not None:
        on_first()
    os.rename(new, out)
    return backup


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _retire(old: Path, out: Path) -> None:
    """Delete ``old`` (the replaced directory), first moving into ``out`` any file of the user's that
    ``out`` lacks (one created while the run was committing), so only pysafe's files are deleted."""
    if old.is_dir() and not old.is_symlink():
        owned = owned_files(old)
        for rel, is_dir in list(_foreign(old, owned)):
            target = out / rel
            if not is_dir and not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(old / rel, target)
    shutil.rmtree(old)


def recover(out: str | os.PathLike, log=None) -> list[str]:
    """Clean up after pysafe runs on ``out`` that died; returns what was done (one line each).

    Only directories named like pysafe's staging/backup siblings of ``out`` whose owner process is
    gone are touched: an uncommitted stage is deleted; a backup (or an exchanged-out old directory) is
    deleted once ``out`` holds the report that replaced it, or renamed back to ``out`` when the run
    died between its two renames. Anything else is left alone.
    """
    out = Path(out)
    done: list[str] = []
    try:
        names = os.listdir(out.parent)
    except OSError:
        return done
    pat = _sibling_re(out.name)
    found = sorted((m for m in map(pat.fullmatch, names) if m), key=lambda m: m.group("kind") != _OLD)
    for m in found:
        try:
            _recover_one(out, m, done)
        except OSError as exc:
            done.append(f"could not clean up {m.group(0)}: {exc.strerror or exc}")
    for line in done:
        if log is not None:
            log(line)
    return done


def _recover_one(out: Path, m: re.Match, done: list) -> None:
    path, kind, run = out.parent / m.group(0), m.group("kind"), m.group("run")
    if not path.is_dir() or path.is_symlink():
        return
    own = read_manifest(path)
    cur = read_manifest(out) if out.is_dir() else None
    committed = cur is not None and cur.get("run_id") == run
    if kind == _TMP and own is not None and own.get("run_id") == run:
        if _alive(own):
            return
        shutil.rmtree(path)  # a stage whose run died before committing it
        done.append(f"removed {path.name}: the staging directory of a pysafe run that did not finish")
    elif kind == _TMP and own is None and set(os.listdir(path)) <= {MANIFEST, MANIFEST + ".tmp"}:
        if _pid_alive(int(m.group("pid"))):
            return
        shutil.rmtree(path)  # killed while creating its stage
        done.append(f"removed {path.name}: an empty staging directory of a pysafe run that died")
    elif committed:  # the directory replaced by run `run`, left when it died before deleting it
        _retire(path, out)
        done.append(f"removed {path.name}: the directory replaced by a finished pysafe run")
    elif kind == _OLD and not os.path.lexists(out) and not _pid_alive(int(m.group("pid"))):
        os.rename(path, out)  # the run died between its two renames: the old directory comes back
        done.append(f"restored {out.name} from {path.name}: a pysafe run died while replacing it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# -- the writer -------------------------------------------------------------------------------------
class Stage:
    """The directory being written: ``path`` is where the files go; ``run_id`` names this run."""

    def __init__(self, out: Path, path: Path, run_id: str, manifest: dict, what: str):
        self.out, self.path, self.run_id, self.manifest, self.what = out, path, run_id, manifest, what
        self.swapped = False

    def adopt(self, rel: str) -> bool:
        """Start from pysafe's own file ``rel`` of the old directory (a cache to extend); False if none."""
        src = self.out / rel
        if rel not in owned_files(self.out) or not src.is_file() or src.is_symlink():
            return False
        dst = self.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return True


def _check_target(out: Path, what: str, overwrite: bool, planned) -> None:
    if os.path.lexists(out) and not out.is_dir():
        raise OutDirError(what, out, "exists and is not a directory", errno.ENOTDIR)
    if not out.is_dir():
        return
    if os.path.ismount(out):
        raise OutDirError(what, out, "is a mount point; pysafe replaces the directory by a rename: give a "
                                     "folder inside it", errno.EBUSY)
    entries = os.listdir(out)
    if entries and not overwrite:
        raise FileExistsError(f"{what} {out}: directory exists and is not empty; pass --overwrite to replace "
                              "the pysafe outputs in it (your other files are kept)")
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutDirError(what, out, "directory is not writable", errno.EACCES)
    owned = owned_files(out)
    for rel in planned:
        p = out / rel
        if os.path.lexists(p) and not p.is_dir() and rel not in owned:
            raise OutDirError(what, out, f"{rel} is in the way and was not written by pysafe (it is not in "
                                         f"{MANIFEST}); move it away: pysafe never replaces your files",
                              errno.EEXIST)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False, what: str = "--out", planned=(),
               kind: str = "report", log=None):
    """Write the directory ``out`` as a whole: yields a :class:`Stage`; commits when the block ends.

    ``planned``: files the command will write (relative paths), checked up front against the user's
    files. Raises :class:`OutDirError` (an ``OSError`` naming ``what out`` and the errno) or
    ``FileExistsError`` before anything is written; any failure inside the block removes the stage and
    leaves ``out`` as it was.
    """
    given = Path(out)
    out = Path(os.path.realpath(given)) if given.is_symlink() else Path(os.path.abspath(given))
    recover(out, log)
    _check_target(out, what, overwrite, planned)
    run_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    stage = _sibling(out, _TMP, run_id)
    manifest = {"format": FORMAT, "kind": kind, "run_id": run_id, "pid": os.getpid(),
                "start_time": _start_time(os.getpid()), "host": socket.gethostname(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "complete": False, "files": []}
    try:
        from pysafe._version import __version__

        manifest["pysafe_version"] = __version__
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        _write_manifest(stage, manifest)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise OutDirError(what, given, f"cannot write in {out.parent}: {exc.strerror or exc}", exc.errno) from None
    st = Stage(out, stage, run_id, manifest, what)
    try:
        yield st
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutDirError) and _inside(exc.filename, stage):
            raise OutDirError(what, given, _describe(exc, stage, "writing"), exc.errno) from exc
        raise
    try:
        _commit(st, given)
    except BaseException as exc:
        if not st.swapped:  # after the swap the stage's name holds the old directory: recover() retires it
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutDirError):
            raise OutDirError(what, given, _describe(exc, stage, "replacing the directory at"), exc.errno) from exc
        raise


def _inside(filename, d: Path) -> bool:
    if not filename:
        return False
    try:
        Path(os.path.abspath(os.fsdecode(filename))).relative_to(d)
    except ValueError:
        return False
    return True


def _commit(st: Stage, given: Path) -> None:
    out, stage = st.out, st.path
    files = []
    for root, dirs, names in os.walk(stage):
        dirs.sort()
        for n in sorted(names):
            rel = str((Path(root) / n).relative_to(stage))
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                files.append(rel)
                fd = os.open(Path(root) / n, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    had = out.is_dir() and bool(os.listdir(out))
    if had:  # the user's files come along: hard links into the stage
        if os.path.ismount(out):
            raise OutDirError(st.what, given, "is a mount point", errno.EBUSY)
        for rel, is_dir in _foreign(out, owned_files(out)):
            dst = stage / rel
            if is_dir:
                if dst.exists() and not dst.is_dir():
                    raise OutDirError(st.what, given, f"your folder {rel} is where pysafe writes a file; move it "
                                                      "away", errno.EEXIST)
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copymode(out / rel, dst)
            elif os.path.lexists(dst):
                raise OutDirError(st.what, given, f"{rel} is in the way and was not written by pysafe; move it "
                                                  "away: pysafe never replaces your files", errno.EEXIST)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _carry(out / rel, dst)
        shutil.copymode(out, stage)
    st.manifest.update(complete=True, files=files)
    _write_manifest(stage, st.manifest)
    _fsync_dir(stage)
    if not out.is_dir():
        os.rename(stage, out)  # nothing there yet
    elif not had:
        os.rename(stage, out)  # an empty directory is replaced by rename(2) in one step
    else:  # one exchange, or two renames that recover() completes or undoes after a crash

        def swapped():
            st.swapped = True

        old = swap_in(stage, out, _sibling(out, _OLD, st.run_id), on_first=swapped)
        swapped()
        _retire(old, out)  # the old directory: at the stage's name after an exchange
    _fsync_dir(out.parent)


# -- a directory pysafe owns whole (a checkpoint, a test-set cache) -----------------------------------
@contextlib.contextmanager
def replace_dir(out: str | os.PathLike, *, overwrite: bool = False):
    """Write a directory that belongs to pysafe entirely: yields a fresh hidden staging directory beside
    ``out``; when the block ends it takes ``out``'s place in one exchange (or two renames) and the old
    directory is deleted. Any failure inside the block removes the stage and leaves ``out`` as it was.

    Unlike :func:`atomic_dir` nothing of the old directory is kept and no manifest is written: use it for
    directories whose every file pysafe defines (a checkpoint, a cache), not for a user's ``--out``.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false (checked before anything is written).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = out.parent / f".{out.name}.tmp-{run}"
    stage.mkdir()  # (not mkdtemp: its 0700 mode would survive the rename)
    try:
        yield stage
        if out.exists():
            old = swap_in(stage, out, out.parent / f".{out.name}.old-{run}")
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
        _fsync_dir(out.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


# -- one JSON file -----------------------------------------------------------------------------------
def json_ready(v):
    """``v`` with NumPy scalars and arrays as Python numbers and lists, tuples as lists, and every
    non-finite float (NaN, ±inf) as ``None``: what strict JSON can hold."""
    import numpy as np

    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    return v


def write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (NaN and ±inf become ``null``, see :func:`json_ready`) to ``path``:
    written beside it and renamed into place, so a reader never sees half a file. A value JSON cannot
    hold raises ``TypeError`` before any file is opened."""
    path = Path(path)
    text = json.dumps(json_ready(obj), indent=indent, allow_nan=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)

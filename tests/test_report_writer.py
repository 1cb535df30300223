"""The report writer under failure: full disks, unwritable --out, kills at every filesystem step,
--overwrite beside the user's files, and tensor names that HDF5 cannot take as they are (issue 13)."""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import pysafe
from pysafe.cli import main

FAST = ["--threads", "1", "--no-plots", "--no-progress"]
MANIFEST = ".pysafe-manifest.json"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cli(args, cwd, fsize=None, env=None):
    """`pysafe ...` in a fresh process (the installed package), optionally under RLIMIT_FSIZE."""
    launcher = "import sys; from pysafe.cli import main; main(prog_name='pysafe')"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-c", launcher, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=limit if fsize else None, env={**os.environ, **(env or {})}, timeout=300)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".pysafe-" in p.name)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = pysafe.make_pair(tmp_path_factory.mktemp("pair"), "tiny")
    return root / "base", root / "tuned"


def _mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


# -- 7: a full disk while results.h5 is written ----------------------------------------------------------
def _assert_one_line_write_error(res, out: Path, code: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])  # not 139: no crash in HDF5's exit handler
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr and "HDF5-DIAG" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error")]
    others = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith(("Error", "pre-flight"))]
    assert len(errors) == 1 and not others, res.stderr
    line = errors[0]
    assert line.startswith(f"Error: --out {out}: ") and code in line and "pysafe-tmp" not in line, line
    return line


def test_file_size_limit_is_one_line_and_no_crash(pair, tmp_path):
    """`ulimit -f 16`: results.h5 hits EFBIG. One line naming --out and the errno, exit 1, nothing left."""
    base, tuned = pair
    out = tmp_path / "x"
    res = _cli(["analyze", base, tuned, "--out", out, "--threads", "1", "--no-progress"], tmp_path, fsize=16 * 1024)
    line = _assert_one_line_write_error(res, out, "errno 27, EFBIG")
    assert "results.h5" in line
    assert not out.exists() and _leftovers(tmp_path) == []
    # over an existing report: the old one stays as it was
    assert _run("analyze", base, tuned, "--out", out, *FAST).exit_code == 0
    before = _tree(out)
    res = _cli(["analyze", base, tuned, "--out", out, "--overwrite", "--threads", "1", "--no-progress"], tmp_path,
               fsize=16 * 1024)
    _assert_one_line_write_error(res, out, "errno 27, EFBIG")
    assert _tree(out) == before and _leftovers(tmp_path) == []


def test_full_disk_is_one_line_and_no_crash(pair, tmp_path):
    """ENOSPC on a 96 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    base, tuned = pair
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "size=96k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "x"
        res = _cli(["analyze", base, tuned, "--out", out, "--threads", "1", "--no-progress"], tmp_path)
        line = _assert_one_line_write_error(res, out, "errno 28, ENOSPC")
        assert "No space left on device" in line
        assert os.listdir(mnt) == []
    finally:
        _umount(mnt)


# -- 8: an unwritable --out fails before any work; stale staging directories are cleaned -----------------
def test_unwritable_out_fails_before_the_analysis(pair, tmp_path):
    base, tuned = pair
    parent = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes anywhere: use a read-only mount
        if not _mount_tmpfs(parent, "ro,size=64k"):
            pytest.skip("running as root and cannot mount a read-only tmpfs")
    else:
        parent.mkdir()
        parent.chmod(0o555)
    try:
        out = parent / "report"
        result = _run("analyze", base, tuned, "--out", out, *FAST)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "pre-flight" not in result.stderr  # refused before the checkpoints were even paired
        line = result.stderr.strip()
        assert line.startswith(f"Error: --out {out}: ") and "pysafe-tmp" not in line, line
        assert ("Read-only file system" in line) or ("Permission denied" in line), line
    finally:
        if os.geteuid() == 0:
            _umount(parent)
        else:
            parent.chmod(0o755)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_killed_run_is_removed_and_nothing_else(pair, tmp_path):
    """A run killed mid-write leaves its stage; the next run removes it, and only it."""
    import socket

    base, tuned = pair
    out = tmp_path / "out"
    pid = _dead_pid()
    stale = tmp_path / f".out.pysafe-tmp-{pid}-0123456789ab"
    (stale / "plots").mkdir(parents=True)
    (stale / "results.h5").write_bytes(b"\x89HDF half")
    (stale / MANIFEST).write_text(json.dumps({"format": "pysafe-output-manifest", "run_id": f"{pid}-0123456789ab",
                                              "pid": pid, "host": socket.gethostname(), "complete": False,
                                              "files": []}))
    # look-alikes that are not a dead pysafe run's: no manifest; a live owner; another directory's stage
    no_marker = tmp_path / f".out.pysafe-tmp-{pid}-ba9876543210"
    no_marker.mkdir()
    (no_marker / "mine.txt").write_text("keep")
    live = tmp_path / f".out.pysafe-tmp-{os.getpid()}-00000000000a"
    live.mkdir()
    (live / MANIFEST).write_text(json.dumps({"format": "pysafe-output-manifest", "run_id": f"{os.getpid()}-00000000000a",
                                             "pid": os.getpid(), "host": socket.gethostname(), "files": []}))
    other = tmp_path / f".other.pysafe-tmp-{pid}-0123456789ab"
    shutil.copytree(stale, other)
    result = _run("analyze", base, tuned, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert f"removed {stale.name}" in result.stderr
    assert not stale.exists()
    assert (no_marker / "mine.txt").read_text() == "keep" and live.exists() and other.exists()
    assert (out / "summary.json").exists()


# -- 9: --overwrite replaces pysafe's files in one rename and keeps the user's ----------------------------
@pytest.mark.parametrize("old_kind", ["manifest", "legacy"])
def test_overwrite_keeps_user_files_and_drops_stale_outputs(pair, tmp_path, old_kind):
    base, tuned = pair
    out = tmp_path / "out"
    assert _run("analyze", base, tuned, "--out", out, "--threads", "1", "--no-progress").exit_code == 0
    first = json.loads((out / "summary.json").read_text())
    shutil.copytree(out / "plots", tmp_path / "first")
    # activations/ of an earlier --prompts run (pysafe's), beside the user's own files
    (out / "activations").mkdir()
    for f in ("clusters_base.json", "rowspace.json", "rowspace.png"):
        (out / "activations" / f).write_text("old run")
    if old_kind == "manifest":
        m = json.loads((out / MANIFEST).read_text())
        m["files"] += ["activations/clusters_base.json", "activations/rowspace.json", "activations/rowspace.png"]
        (out / MANIFEST).write_text(json.dumps(m))
    else:  # a report written before manifests existed
        (out / MANIFEST).unlink()
    (out / "activations" / "my_notes.txt").write_text("mine 1")
    (out / "plots" / "mine.png").write_bytes(b"mine 2")
    (out / "notes.txt").write_text("mine 3")
    (out / "data" / "deep").mkdir(parents=True)
    (out / "data" / "deep" / "x.csv").write_text("mine 4")
    (out / "empty_dir").mkdir()
    os.symlink("notes.txt", out / "link")
    ino = (out / "notes.txt").stat().st_ino
    result = _run("analyze", base, tuned, "--out", out, "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    t = _tree(out)
    assert not any(k.startswith("activations/") and k != "activations/my_notes.txt" for k in t), sorted(t)
    assert t["activations/my_notes.txt"] == b"mine 1" and t["plots/mine.png"] == b"mine 2"
    assert t["notes.txt"] == b"mine 3" and t["data/deep/x.csv"] == b"mine 4" and t["link"] == b"notes.txt"
    assert (out / "empty_dir").is_dir() and (out / "link").is_symlink()
    assert (out / "notes.txt").stat().st_ino == ino  # kept by a hard link, not copied
    assert not (out / "plots" / "sv_decay.png").exists()  # --no-plots: the old plots went with the old report
    assert _leftovers(tmp_path) == []
    m = json.loads((out / MANIFEST).read_text())
    assert set(m["files"]) == {"summary.json", "results.h5", "index.html"} and m["complete"] is True
    assert json.loads((out / "summary.json").read_text())["run_id"] == m["run_id"]
    from PIL import Image

    for f in ("sv_decay.png", "heatmap_delta_rel.png"):  # the first run's real plots carried its run id
        with Image.open(tmp_path / "first" / f) as im:
            assert im.text["pysafe_run_id"] == first["run_id"]


def test_overwrite_refuses_to_replace_a_user_file(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "sv_decay.png").write_bytes(b"my own figure")
    result = _run("analyze", base, tuned, "--out", out, "--overwrite", "--threads", "1", "--no-progress")
    assert result.exit_code == 1 and "pre-flight" not in result.stderr
    assert "plots/sv_decay.png" in result.stderr and "not written by pysafe" in result.stderr
    assert (out / "plots" / "sv_decay.png").read_bytes() == b"my own figure"
    assert _leftovers(tmp_path) == []


@pytest.fixture
def quick_demo(monkeypatch):
    """`pysafe demo` on the shipped checkpoints with its slow parts (evaluation, clusters, plots) replaced by
    stubs that write the same files: the folder rules are what is tested here."""
    from pysafe.pipeline import demo as pipeline

    def tables(named, n, device, eval_dir, *a, **k):
        eval_dir.mkdir(parents=True, exist_ok=True)
        for label in named:
            (eval_dir / f"{label}.json").write_text("{}")
        return {label: {} for label in named}

    def clusters(named, out, *a, **k):
        return []

    monkeypatch.setattr(pipeline, "safety_tables", tables)
    monkeypatch.setattr(pipeline, "clusters_and_claims", clusters)
    monkeypatch.setattr(pysafe.report, "write_plots", _small_plots)  # 15 matplotlib figures per demo otherwise
    monkeypatch.setattr(pipeline, "format_table", lambda t, *a, **k: "table")


def test_demo_follows_the_report_folder_rules(quick_demo, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    result = _run("demo", "--out", out, "--n", "2")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert _tree(out) == before  # the user's summary.json is not silently overwritten
    result = _run("demo", "--out", out, "--n", "2", "--overwrite")
    assert result.exit_code == 1 and "summary.json" in result.output and "not written by pysafe" in result.output
    assert _tree(out) == before
    (out / "summary.json").unlink()
    result = _run("demo", "--out", out, "--n", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert (out / "notes.txt").read_text() == "mine"
    for stage in ("ssft", "dpo", "unlearn"):
        assert json.loads((out / "analyze" / stage / "summary.json").read_text())["run_id"] == s["run_id"]
    (out / "analyze" / "ssft" / "plots" / "mine.png").write_bytes(b"mine")
    result = _run("demo", "--out", out, "--n", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "analyze" / "ssft" / "plots" / "mine.png").read_bytes() == b"mine"
    assert json.loads((out / "summary.json").read_text())["run_id"] != s["run_id"]
    assert "index.html" in json.loads((out / ".pysafe-manifest.json").read_text())["files"]
    assert _leftovers(tmp_path) == []
    # a page of the user's where pysafe writes index.html is refused up front, never overwritten
    (out / ".pysafe-manifest.json").write_text(
        (out / ".pysafe-manifest.json").read_text().replace('"index.html",', ""))
    result = _run("demo", "--out", out, "--n", "2", "--overwrite")
    assert result.exit_code == 1 and "index.html" in result.output and "not written by pysafe" in result.output


# -- 10: tensor names that are not valid HDF5 keys -----------------------------------------------------
TRICKY = [".", "", "x\0y", "a/b", "a", "..", ".hidden", "%41", "%", "/lead", "trail/", "a//b", "é/ü∂ 名前",
          "esc\x1b[2J", "tab\tnl\n", "L" * 4000]


def test_tricky_tensor_names_round_trip_through_results_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    b = {n: rng.standard_normal((6, 4)).astype(np.float32) for n in TRICKY}
    t = {n: v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for n, v in b.items()}
    b["sk/ip"], t["sk/ip"] = np.zeros((3, 3), np.float32), np.zeros((3, 4), np.float32)
    for side, tensors in (("base", b), ("tuned", t)):
        (tmp_path / side).mkdir()
        save_file(tensors, str(tmp_path / side / "model.safetensors"))
    out = tmp_path / "out"
    result = _run("analyze", tmp_path / "base", tmp_path / "tuned", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(m["name"] for m in summary["matrices"]) == sorted(TRICKY)
    from pysafe.report.h5 import h5_key, h5_name, read_h5

    r = read_h5(out / "results.h5")
    assert list(r["tensors"]) == [m["name"] for m in summary["matrices"]]
    assert r["skipped"] == {"sk/ip": summary["skipped"][0]["reason"]}
    for m in summary["matrices"]:
        rec = r["tensors"][m["name"]]
        assert rec["delta_rel"] == pytest.approx(m["delta_rel"])
        np.testing.assert_allclose(rec["sv_delta"][:len(m["sv_delta"])], m["sv_delta"], rtol=1e-12)
    # independently of read_h5: one group per tensor, keyed by the encoding, the original name stored
    with h5py.File(out / "results.h5", "r") as f:
        assert len(f["tensors"]) == len(TRICKY)
        for n in TRICKY:
            g = f["tensors"][h5_key(n)]
            v = g.attrs["name"]
            assert (bytes(v).decode() if isinstance(v, np.void) else v) == n
        keys = [k.decode() if isinstance(k, bytes) else k for k in f["tensor_keys"][()]]
        assert [h5_name(k) for k in keys] == [m["name"] for m in summary["matrices"]]
    for n in TRICKY + ["\ud800", "%2F", "a%"]:
        k = h5_key(n)
        assert h5_name(k) == n and "/" not in k and "\0" not in k and k and not k.startswith(".")


# -- the kill-injection test ----------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_kill_hook(root: str, kill_at: int) -> None:
    """In a forked child: SIGKILL this process just before its ``kill_at``-th filesystem change under
    ``root`` (mkdir, open for writing, link, symlink, rename/replace, exchange, unlink, rmdir)."""
    import pysafe._atomic as A

    count = [0]

    def under(a):
        if isinstance(a, (str, bytes, os.PathLike)):
            return os.path.abspath(os.fsdecode(a)).startswith(root)
        return False

    def step():
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn, writes=lambda a, k: True):
        def hooked(*a, **k):
            if (any(under(x) for x in a[:2]) or k.get("dir_fd") is not None) and writes(a, k):
                step()
            return fn(*a, **k)
        return hooked

    for name in ("mkdir", "rename", "replace", "link", "symlink", "unlink", "remove", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    os.open = wrap(os.open, lambda a, k: bool((a[1] if len(a) > 1 else k.get("flags", 0)) & _WRITE_FLAGS))
    opener = wrap(builtins.open, lambda a, k: any(c in (a[1] if len(a) > 1 else k.get("mode", "r")) for c in "wax+"))
    builtins.open = io.open = opener
    exchange = A._exchange

    def hooked_exchange(a, b):
        step()
        return exchange(a, b)

    A._exchange = hooked_exchange


def _check_report(out: Path, user: dict) -> str:
    """``out`` is one complete report: every file in the manifest, its run id in summary.json, results.h5
    and each plot, no pysafe file outside it, the user's files as they were. Returns the run id."""
    import h5py
    from PIL import Image

    m = json.loads((out / MANIFEST).read_text())
    run = m["run_id"]
    assert m["complete"] is True
    t = _tree(out)
    assert set(t) == set(m["files"]) | {MANIFEST} | set(user), sorted(set(t) ^ (set(m["files"]) | set(user)))
    assert {k: t[k] for k in user} == user
    assert json.loads(t["summary.json"])["run_id"] == run
    with h5py.File(out / "results.h5", "r") as f:
        assert f.attrs["run_id"] == run
    pngs = [f for f in m["files"] if f.endswith(".png")]
    assert len(pngs) == 5
    for f in pngs:
        with Image.open(out / f) as im:
            assert im.text.get("pysafe_run_id") == run, f
    return run


def _small_plots(cmp, where, run_id=None):
    """write_plots' five files (1-pixel PNGs with the run id, written the same way: open, write, close)."""
    from PIL import Image, PngImagePlugin

    from pysafe.report.plots import PLOT_FILES

    info = PngImagePlugin.PngInfo()
    info.add_text("pysafe_run_id", run_id or "")
    for f in PLOT_FILES:
        Image.new("L", (1, 1)).save(Path(where) / f, pnginfo=info)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_kill_at_every_filesystem_step(pair, tmp_path, exchange, monkeypatch):
    """SIGKILL the writer before each of its filesystem steps in turn: the out directory always holds one
    complete report (old or new; between the two renames of the fallback, none), never a mixture, and
    the next run leaves no staging directory and restores the old report where there was none."""
    pytest.importorskip("PIL")
    from pysafe._atomic import recover
    from pysafe.report import write_report
    from pysafe.weights import compare

    if not exchange:
        monkeypatch.setenv("PYSAFE_NO_RENAME_EXCHANGE", "1")
    monkeypatch.setattr(pysafe.report, "write_plots", _small_plots)  # matplotlib would take seconds per run
    base, tuned = pair
    cmp = compare(base, tuned, threads=1)
    parent = tmp_path / "reports"
    out = parent / "out"
    write_report(cmp, out)
    (out / "notes.txt").write_text("mine")
    (out / "plots" / "mine.png").write_bytes(b"mine")
    user = {"notes.txt": b"mine", "plots/mine.png": b"mine"}
    old_run = _check_report(out, user)
    template = tmp_path / "template"
    shutil.copytree(out, template, symlinks=True)
    outcomes = {}
    for kill_at in range(1, 200):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(template, out, symlinks=True)
        pid = os.fork()
        if pid == 0:  # the child: write the new report, with the hook armed
            code = 3
            try:
                _install_kill_hook(str(parent), kill_at)
                write_report(cmp, out, overwrite=True, plots=True)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), (kill_at, status)
        if out.exists():
            run = _check_report(out, user)
            state = "old" if run == old_run else "new"
        else:  # only between the two renames of the fallback
            assert not exchange, kill_at
            state = "none"
        assert killed or state == "new"
        recover(out)  # what the next run does first
        assert _leftovers(parent) == [], (kill_at, _leftovers(parent))
        after = _check_report(out, user)
        assert after == (old_run if state in ("old", "none") else run)
        outcomes[kill_at] = state
        if not killed:
            break
    else:
        pytest.fail("the writer never finished")
    steps = len(outcomes) - 1
    tally = {k: list(outcomes.values()).count(k) for k in ("old", "none", "new")}
    print(f"kill-injection ({'exchange' if exchange else 'two renames'}): {steps} kills + 1 finished run, out held {tally}; "
          "0 mixtures, 0 leftovers after recovery")
    assert steps >= 15, outcomes  # mkdir, manifest, h5, 5 plots, summary, links, swap, cleanup...
    assert "new" in outcomes.values() and "old" in outcomes.values()
    assert ("none" in outcomes.values()) == (not exchange)
    # and the next real run over a recovered directory works
    write_report(cmp, out, overwrite=True, plots=False)
    assert _leftovers(parent) == [] and (out / "notes.txt").read_text() == "mine"

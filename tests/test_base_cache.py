"""The on-disk cache of W_base's decomposition (pysafe.svdcache): a hit gives the uncached records exactly,
a changed base file or changed base options miss, damaged entries and concurrent writers never break a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import pysafe
from pysafe import _core
from pysafe.svdcache import BaseCache
from pysafe.weights import compare

from recordkit import write_lora_adapter

#: record keys allowed to differ between a cached and an uncached run
VOLATILE = ("time_", "base_svd_cached")
#: a few variants that exercise the randomized path (tiny matrices), fixed and energy base ranks, centering, f64
VARIANTS = {
    "default": {},
    "randomized": {"exact_max_dim": 0, "base_rank": 12, "rank": 4, "center": True},
    "f64-energy": {"exact_max_dim": 0, "base_energy": 0.5, "dtype": "f64"},
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = pysafe.make_pair(tmp_path_factory.mktemp("pair"), "tiny")
    return root / "base", root / "tuned"


def _same_records(a, b) -> None:
    """Every record key equal (arrays element by element, NaN == NaN), apart from timings and the hit flag."""
    assert [r["name"] for r in a.records] == [r["name"] for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert set(ra) == set(rb), ra["name"]
        for k in ra:
            if k.startswith(VOLATILE):
                continue
            va, vb = ra[k], rb[k]
            if isinstance(va, np.ndarray) or isinstance(va, float):
                assert np.array_equal(np.asarray(va), np.asarray(vb), equal_nan=True), (ra["name"], k)
            else:
                assert va == vb, (ra["name"], k, va, vb)


def _matrix_records(cmp):
    return [r for r in cmp.records if len(r["stored_shape"]) == 2]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hit_gives_identical_records(pair, tmp_path, variant):
    base, tuned = pair
    opts = dict(VARIANTS[variant], threads=2)
    plain = compare(base, tuned, **opts)
    shared = BaseCache(tmp_path)  # one object for both calls, as the demo uses it: counts are per call
    first = compare(base, tuned, cache=shared, **opts)
    second = compare(base, tuned, cache=shared, **opts)
    n = len(_matrix_records(plain))
    assert n > 0
    assert first.cache["misses"] == n and first.cache["writes"] == n and first.cache["hits"] == 0
    assert second.cache["hits"] == n and second.cache["writes"] == 0 and second.cache["misses"] == 0
    assert all(r["base_svd_cached"] for r in _matrix_records(second))
    assert all(r["time_svd_base"] == 0.0 for r in _matrix_records(second))
    assert not any(r["base_svd_cached"] for r in _matrix_records(plain) + _matrix_records(first))
    _same_records(plain, first)
    _same_records(plain, second)


def test_only_base_options_enter_the_key(pair, tmp_path):
    base, tuned = pair
    compare(base, tuned, cache=tmp_path, threads=1, base_rank=8, rank=2, exact_max_dim=0)
    n = len(_matrix_records(compare(base, tuned, threads=1, rank=2)))
    # ΔW's options do not change W_base's decomposition: reused
    other_delta = compare(base, tuned, cache=tmp_path, threads=1, base_rank=8, rank=5, exact_max_dim=0)
    assert other_delta.cache["hits"] == n
    _same_records(compare(base, tuned, threads=1, base_rank=8, rank=5, exact_max_dim=0), other_delta)
    # every option of the base SVD does: recomputed
    for change in ({"base_rank": 9}, {"seed": 1}, {"center": True}, {"dtype": "f64"}, {"power_iters": 3},
                   {"oversample": 4}, {"exact_max_dim": 1024}):
        opts = {"threads": 1, "base_rank": 8, "rank": 2, "exact_max_dim": 0, **change}
        c = compare(base, tuned, cache=tmp_path, **opts)
        assert c.cache["hits"] == 0, change
        _same_records(compare(base, tuned, **opts), c)


def _rewrite_tensor(base: Path, name: str) -> str:
    """Rewrite the shard holding `name` with that tensor changed (as a training script saving again would)."""
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].clone()
    tensors[name][0, :] *= 4.0  # a change in the first row only
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard.name


def test_changed_base_file_invalidates(tmp_path):
    root = pysafe.make_pair(tmp_path / "pair", "tiny")
    base, tuned = root / "base", root / "tuned"
    cache = tmp_path / "cache"
    name = "model.layers.1.mlp.down_proj.weight"
    before = compare(base, tuned, cache=cache, threads=1)
    assert before.cache["writes"] > 0
    _rewrite_tensor(base, name)
    after = compare(base, tuned, cache=cache, threads=1)
    fresh = compare(base, tuned, threads=1)
    _same_records(fresh, after)
    rec = after.record(name)
    assert not rec["base_svd_cached"]
    assert not np.array_equal(rec["sv_base"], before.record(name)["sv_base"])  # the change is visible


def _tensor_offset(shard: Path, name: str) -> int:
    h = _core.read_header(str(shard))
    return h["data_start"] + next(e["data_offsets"][0] for e in h["entries"] if e["name"] == name)


def test_in_place_rewrite_with_restored_mtime_invalidates(tmp_path):
    """Same size and inode, mtime set back (as `touch -r` would): still a miss."""
    root = pysafe.make_pair(tmp_path / "pair", "tiny")
    base = root / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    shard = base / index["weight_map"][name]
    offset = _tensor_offset(shard, name)
    cache = BaseCache(tmp_path / "cache")
    c1 = compare(base, root / "tuned", cache=cache, threads=1)
    assert c1.record(name)["base_svd_cached"] is False
    st = os.stat(shard)
    with open(shard, "r+b") as fh:  # flip bits of the tensor's first two bytes in place
        fh.seek(offset)
        b = fh.read(2)
        fh.seek(offset)
        fh.write(bytes(x ^ 0x40 for x in b))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_mtime_ns == st.st_mtime_ns and os.stat(shard).st_ino == st.st_ino
    c2 = compare(base, root / "tuned", cache=BaseCache(tmp_path / "cache"), threads=1)
    assert c2.record(name)["base_svd_cached"] is False
    _same_records(compare(base, root / "tuned", threads=1), c2)


def test_key_follows_the_sampled_bytes(pair):
    """With the file's identity unchanged, the sampled-bytes digest alone tells two contents apart; bytes
    outside the sampled windows of a large tensor do not enter it (the documented trade-off)."""
    base, _ = pair
    ckpt = pysafe.Checkpoint.open(base)
    name = "model.layers.0.mlp.up_proj.weight"
    params = _core.AnalyzeParams()
    cache = BaseCache(None)
    buf = np.array(ckpt.buffer(name))
    k0 = cache.key(ckpt, name, buf, params, False)
    assert cache.key(ckpt, name, buf.copy(), params, False) == k0
    for pos in (0, buf.size // 2, buf.size - 1):
        changed = buf.copy()
        changed[pos] ^= 1
        assert cache.key(ckpt, name, changed, params, False) != k0, pos
    assert cache.key(ckpt, name, buf, params, True) != k0
    big = np.zeros(1 << 20, dtype=np.uint8)
    changed = big.copy()
    changed[4096 + 10] = 1  # between the first and the second window
    assert pysafe.svdcache.sample_digest(changed) == pysafe.svdcache.sample_digest(big)
    changed[-1] = 1
    assert pysafe.svdcache.sample_digest(changed) != pysafe.svdcache.sample_digest(big)
    ckpt.close()


def test_damaged_entries_are_ignored(pair, tmp_path):
    base, tuned = pair
    cache = BaseCache(tmp_path)
    plain = compare(base, tuned, threads=1)
    compare(base, tuned, cache=cache, threads=1)
    entries = sorted(cache.dir.glob("*.npz"))
    assert len(entries) >= 5
    entries[0].write_bytes(entries[0].read_bytes()[:100])         # truncated
    entries[1].write_bytes(b"not a zip file at all")               # garbage
    raw = bytearray(entries[2].read_bytes())                       # one bit of the arrays flipped
    raw[200] ^= 0x01
    entries[2].write_bytes(bytes(raw))
    entries[3].write_bytes(entries[4].read_bytes())                # another entry's content: key mismatch
    damaged = BaseCache(tmp_path)
    c = compare(base, tuned, cache=damaged, threads=1)
    _same_records(plain, c)
    assert c.cache["misses"] == 4 and c.cache["writes"] == 4
    assert len(damaged.notes) == 4 and all("ignored" in n for n in damaged.notes)
    again = compare(base, tuned, cache=BaseCache(tmp_path), threads=1)  # rewritten valid entries
    assert again.cache["misses"] == 0


def _store_many(root: str, key: str, n: int) -> None:
    cache = BaseCache(root)
    rng = np.random.default_rng(0)  # every writer writes the same entry, as two runs of one analysis do
    U, S, Vt = (rng.standard_normal(s).astype(np.float32) for s in ((300, 20), (30,), (20, 200)))
    d = {"U": U, "S": np.sort(np.abs(S))[::-1].copy(), "Vt": Vt, "rows": 300, "cols": 200, "k": 20, "f64": False,
         "method": "randomized", "full_spectrum": False, "energy_reached": True, "fro2": 1.0,
         "rel_error": float("nan"), "tail_rel": 0.5, "sketch_passes": 1}
    for _ in range(n):
        cache.store(key, d, "t")


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    """Writers replacing one entry over and over (threads here; the rename is what makes it safe across
    processes too, see the next test) while a reader loads it: never a partial or damaged file."""
    key = "ab" * 32
    writers = [threading.Thread(target=_store_many, args=(str(tmp_path), key, 60)) for _ in range(2)]
    for w in writers:
        w.start()
    reader = BaseCache(tmp_path)
    seen = 0
    while any(w.is_alive() for w in writers):
        if reader.load(key, 300, 200, False) is not None:
            seen += 1
    for w in writers:
        w.join()
    assert reader.notes == []
    assert reader.load(key, 300, 200, False) is not None
    assert [p.name for p in reader.dir.iterdir()] == [f"{key}.npz"]  # no temporary left behind
    assert seen > 0  # the reader did read while the writers were replacing the entry


def _shape_of(entry: Path) -> tuple[int, int]:
    with np.load(entry, allow_pickle=False) as z:
        return z["U"].shape[0], z["Vt"].shape[1]


def test_two_analyses_at_once_share_the_cache(pair, tmp_path):
    base, tuned = pair
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "pysafe", "analyze", str(base), str(tuned), "--no-plots", "--threads", "1",
           "--cache", str(cache)]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"out{i}")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for i in range(2)]
    reader = BaseCache(cache)
    while any(p.poll() is None for p in procs):  # read whatever entries exist while both write
        entries = [e for e in reader.dir.glob("*.npz") if not e.name.startswith(".")] if reader.dir.exists() else []
        for entry in entries:  # (.tmp-* files are writers' work in progress)
            reader.load(entry.stem, *_shape_of(entry), False)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert reader.notes == []
    check = BaseCache(cache)
    c = compare(base, tuned, cache=check, threads=1)
    assert c.cache["misses"] == 0 and check.notes == []
    _same_records(compare(base, tuned, threads=1), c)
    for i in range(2):
        s = json.loads((tmp_path / f"out{i}" / "summary.json").read_text())
        assert s["cache"]["dir"] == str(check.dir)


def test_prune_keeps_the_bound_least_recently_used_first(pair, tmp_path):
    base, tuned = pair
    cache = BaseCache(tmp_path)
    compare(base, tuned, cache=cache, threads=1)
    entries = sorted(cache.dir.glob("*.npz"))
    sizes = {p: p.stat().st_size for p in entries}
    for i, p in enumerate(entries):  # distinct use times, oldest first
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    keep = entries[-3:]
    small = BaseCache(tmp_path, max_bytes=sum(sizes[p] for p in keep))
    stale = small.dir / ".tmp-stale.npz"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    small.prune()
    assert sorted(small.dir.iterdir()) == keep


def test_cli_cache_options(pair, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pysafe.cli import main

    base, tuned = pair
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run = lambda *a: CliRunner().invoke(main, ["analyze", str(base), str(tuned), "--no-plots", "--threads", "1", *a])
    r = run("--out", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    default = tmp_path / "xdg" / "pysafe"
    assert any(default.rglob("*.npz"))
    r = run("--out", str(tmp_path / "b"))
    assert "from cache" in r.stderr and " 0 from cache" not in r.stderr
    r = run("--out", str(tmp_path / "c"), "--no-cache")
    assert r.exit_code == 0 and "from cache" not in r.stderr
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["cache"] is None
    r = run("--out", str(tmp_path / "d"), "--cache", str(tmp_path / "mine"))
    assert r.exit_code == 0 and any((tmp_path / "mine").rglob("*.npz"))
    r = run("--out", str(tmp_path / "e"), "--cache", str(tmp_path / "mine"), "--no-cache")
    assert r.exit_code == 2 and "contradict" in r.output


def test_adapter_path_hits_and_matches(pair, tmp_path):
    """PEFT adapters (the factored path): a hit gives the uncached records; the dense path's entries are not
    reused there (another thread layout of the base SVD), nor entries made with another thread count."""
    base, tuned = pair
    targets = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    adapter = write_lora_adapter(base, targets, tmp_path / "adapter")
    cache = BaseCache(tmp_path / "cache")
    compare(base, tuned, cache=cache, threads=2, include=r"layers\.[01]\.")  # dense entries for these tensors
    plain = compare(base, adapter, threads=2)
    first = compare(base, adapter, cache=cache, threads=2)
    second = compare(base, adapter, cache=cache, threads=2)
    assert first.cache["hits"] == 0 and first.cache["writes"] == 2
    assert second.cache["hits"] == 2
    _same_records(plain, first)
    _same_records(plain, second)
    one = compare(base, adapter, cache=cache, threads=1)
    assert one.cache["hits"] == 0
    _same_records(compare(base, adapter, threads=1), one)


def test_extra_fields_round_trip(tmp_path):
    """Arrays and values beyond U, S, Vt (fields a newer core returns) come back as they were stored."""
    cache = BaseCache(tmp_path)
    rng = np.random.default_rng(1)
    d = {"U": rng.standard_normal((30, 3)).astype(np.float32), "S": np.array([3.0, 2.0, 1.0, 0.5], np.float32),
         "Vt": rng.standard_normal((3, 20)).astype(np.float32), "rows": 30, "cols": 20, "k": 3, "f64": False,
         "method": "exact", "full_spectrum": True, "energy_reached": True, "fro2": 14.25, "rel_error": float("nan"),
         "tail_rel": 0.1, "sketch_passes": 0, "spectrum": np.linspace(3, 0.1, 20), "tol_reached": True}
    cache.store("cd" * 32, d, "t")
    got = cache.load("cd" * 32, 30, 20, False)
    assert got is not None and cache.notes == []
    assert set(got) == set(d)
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        elif isinstance(v, float) and np.isnan(v):
            assert np.isnan(got[k])
        else:
            assert got[k] == v, k
    assert cache.load("cd" * 32, 30, 21, False) is None and "expected 30x21" in cache.notes[-1]

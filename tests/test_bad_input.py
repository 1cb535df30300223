"""Bad input never crashes and always says what is wrong: one test per header code, then checkpoints.

Header cases come from ``bad_headers.py`` (the smallest file per validation condition). Checkpoint-level
cases go through the public entry points, ``pysafe.Checkpoint.open`` and ``pysafe.compare``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import bad_headers
import pysafe
from pysafe import _core

REPO = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------------
def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((24, 16)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((16, 24)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(16)).astype(np.float32),
    }


def _perturbed(tensors: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in tensors.items()}


def _single(d: Path, tensors: dict[str, np.ndarray]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_numpy(tensors, str(d / "model.safetensors"))
    return d


def _sharded(d: Path, shards: dict[str, dict[str, np.ndarray]], weight_map: dict[str, str] | None = None) -> Path:
    """Shards written with safetensors, plus an index (by default the true weight map)."""
    d.mkdir(parents=True, exist_ok=True)
    true_map = {}
    for fname, tensors in shards.items():
        save_numpy(tensors, str(d / fname))
        true_map.update({name: fname for name in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": true_map if weight_map is None else weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _two_shards(d: Path, seed: int = 0) -> Path:
    w = _weights(seed)
    names = list(w)
    return _sharded(d, {"model-00001-of-00002.safetensors": {names[0]: w[names[0]]},
                        "model-00002-of-00002.safetensors": {n: w[n] for n in names[1:]}})


def _skip_reason(cmp, name: str) -> str:
    reasons = [s["reason"] for s in cmp.skipped if s["name"] == name]
    assert reasons, f"{name} not in skipped: {cmp.skipped}"
    return reasons[0]


def _snapshot(*dirs: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


# -- header validation: one case per condition, through both readers ------------------------------
def test_cases_cover_every_reachable_header_code():
    assert {c.code for c in bad_headers.CASES} == set(bad_headers.REACHABLE_CODES)
    header = REPO / "csrc" / "io" / "safetensors.h"
    if not header.exists():
        pytest.skip("source tree not available")
    declared = set(re.findall(r'constexpr const char\* k\w+ = "(\w+)";', header.read_text()))
    # header_overflow is the one code no file can reach (see bad_headers' docstring)
    assert declared == set(bad_headers.REACHABLE_CODES) | {"header_overflow"}


@pytest.mark.parametrize("reader", ["read_header", "SafetensorsFile"])
@pytest.mark.parametrize("case", bad_headers.CASES, ids=lambda c: c.id)
def test_header_error(tmp_path, case, reader):
    path = case.build(tmp_path)
    fn = pysafe.read_header if reader == "read_header" else _core.SafetensorsFile
    with pytest.raises(pysafe.HeaderError) as info:
        fn(str(path))
    exc = info.value
    assert isinstance(exc, ValueError) and isinstance(exc, pysafe.CheckpointError)
    assert exc.code == case.code
    msg = str(exc)
    assert path.name in msg
    for fragment in case.fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


@pytest.mark.parametrize("case", [c for c in bad_headers.CASES if c.id in
                                  ("header_longer_than_file", "lying_header", "truncated_data", "unknown_dtype")],
                         ids=lambda c: c.id)
def test_header_error_through_checkpoint_open(tmp_path, case):
    path = case.build(tmp_path)
    with pytest.raises(pysafe.HeaderError) as info:
        pysafe.Checkpoint.open(path)
    assert info.value.code == case.code and path.name in str(info.value)


def test_first_failing_check_wins(tmp_path):
    # unknown dtype is checked before the size of the offsets, and entries before contiguity
    p = bad_headers.json_file(tmp_path / "two_faults.safetensors",
                              {"a": bad_headers.entry("F32", [2], 4, 12), "b": bad_headers.entry("Q4", [2], 0, 3)},
                              b"\x00" * 12)
    with pytest.raises(pysafe.HeaderError) as info:
        pysafe.read_header(p)
    assert info.value.code == "unknown_dtype" and "'b'" in str(info.value)


@pytest.mark.parametrize("shape,dtype,what", [([2**32, 2**32, 2], "U8", "element count"),
                                              ([2**62], "F32", "byte count")])
def test_size_overflow_is_checked(tmp_path, shape, dtype, what):
    p = bad_headers.json_file(tmp_path / "overflow.safetensors", {"w": bad_headers.entry(dtype, shape, 0, 8)},
                              b"\x00" * 8)
    with pytest.raises(pysafe.HeaderError) as info:
        pysafe.read_header(p)
    assert info.value.code == "size_mismatch"
    assert f"overflows the {what}" in str(info.value) and "'w'" in str(info.value)


def test_truncated_real_file_says_truncated(tmp_path):
    path = tmp_path / "model.safetensors"
    save_numpy(_weights(), str(path))
    size = path.stat().st_size
    bad_headers.truncate_file(path, size - 10)
    with pytest.raises(pysafe.HeaderError) as info:
        _core.SafetensorsFile(str(path))
    assert info.value.code == "data_size_mismatch"
    assert "truncated" in str(info.value) and f"file size {size - 10}" in str(info.value)


def test_malformed_files_never_crash_the_interpreter(tmp_path):
    # In a child process, so a segfault or abort shows up as a return code rather than killing pytest.
    paths = [str(c.build(tmp_path)) for c in bad_headers.CASES]
    code = (
        "import sys, pysafe\n"
        "from pysafe import _core\n"
        "n = 0\n"
        "for p in sys.argv[1:]:\n"
        "    for fn in (pysafe.read_header, _core.SafetensorsFile, pysafe.Checkpoint.open):\n"
        "        try:\n"
        "            fn(p)\n"
        "        except pysafe.HeaderError:\n"
        "            n += 1\n"
        "print('caught', n)\n"
    )
    # cwd=tmp_path: from the repository root, `python -c` would import the source tree, not the install
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"caught {3 * len(paths)}"


# -- buffers ----------------------------------------------------------------------------------------
def test_buffer_is_a_read_only_uint8_view(tmp_path):
    w = _weights()
    path = tmp_path / "model.safetensors"
    save_numpy(w, str(path))
    before = path.read_bytes()
    f = _core.SafetensorsFile(str(path))
    name = "model.layers.0.mlp.up_proj.weight"
    buf = f.buffer(name)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.shape == (w[name].nbytes,)
    assert not buf.flags.writeable
    with pytest.raises(ValueError):
        buf[0] = 1
    with pytest.raises(ValueError):
        buf.setflags(write=True)  # the view does not own its memory: it cannot be made writable
    assert buf.tobytes() == w[name].tobytes()
    assert path.read_bytes() == before


def test_buffer_of_unknown_name_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "model.safetensors"
    save_numpy(_weights(), str(path))
    f = _core.SafetensorsFile(str(path))
    with pytest.raises(pysafe.PysafeError) as info:
        f.buffer("model.layers.0.mlp.gate_proj.weight")
    assert "gate_proj" in str(info.value) and path.name in str(info.value)
    ckpt = pysafe.Checkpoint.open(path)
    with pytest.raises(pysafe.TensorNotFoundError) as info:
        ckpt.buffer("model.layers.0.mlp.up_proj.weigth")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)  # the nearest key is suggested


def test_empty_tensor_at_end_of_file_has_an_empty_buffer(tmp_path):
    path = tmp_path / "model.safetensors"
    save_numpy({"a": np.ones(3, np.float32), "z": np.zeros((0, 4), np.float32)}, str(path))
    f = _core.SafetensorsFile(str(path))
    assert f.buffer("z").shape == (0,)
    assert f.buffer("a").tobytes() == np.ones(3, np.float32).tobytes()


# -- checkpoint layout ------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pysafe.Checkpoint.open(missing)
    good = _single(tmp_path / "good", _weights())
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pysafe.compare(good, missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pysafe.compare(missing, good)


def test_directory_without_weights(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "README.md").write_text("no weights here")
    with pytest.raises(pysafe.CheckpointError) as info:
        pysafe.Checkpoint.open(d)
    msg = str(info.value)
    assert str(d) in msg and "no weights found" in msg
    for looked_for in ("model.safetensors.index.json", "model.safetensors", "*.safetensors", "adapter_config.json",
                       "*.bin"):
        assert looked_for in msg


def test_unsupported_file_type(tmp_path):
    p = tmp_path / "weights.npz"
    np.savez(p, w=np.zeros(3))
    with pytest.raises(pysafe.CheckpointError, match=r"unsupported file type '\.npz'"):
        pysafe.Checkpoint.open(p)


def test_index_points_to_missing_shard(tmp_path):
    d = _two_shards(tmp_path / "m")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(pysafe.ShardIndexError) as info:
        pysafe.Checkpoint.open(d)
    assert "model-00002-of-00002.safetensors" in str(info.value) and "does not exist" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("shard", ["../model.safetensors", "sub/model.safetensors", "..", "", "a\\b.safetensors"])
def test_index_with_unsafe_shard_name(tmp_path, shard):
    d = tmp_path / "m"
    d.mkdir()
    save_numpy({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))  # what '..' would reach
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(pysafe.ShardIndexError) as info:
        pysafe.Checkpoint.open(d)
    assert info.value.code == "bad_shard_name"
    assert "model.safetensors.index.json" in str(info.value) and f"'{shard}'" in str(info.value)


@pytest.mark.parametrize("text,code", [("{not json", "invalid_json"), ("[1, 2]", "not_object"),
                                       ('{"metadata": {}}', "no_weight_map"),
                                       ('{"weight_map": {"w": 3}}', "bad_weight_map")])
def test_malformed_index(tmp_path, text, code):
    d = _two_shards(tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(pysafe.ShardIndexError) as info:
        pysafe.Checkpoint.open(d)
    assert info.value.code == code
    assert "model.safetensors.index.json" in str(info.value)


def test_index_lists_tensor_missing_from_its_shard(tmp_path):
    w = _weights()
    wm = {n: "model-00001-of-00001.safetensors" for n in w}
    wm["model.layers.0.mlp.gate_proj.weight"] = "model-00001-of-00001.safetensors"
    d = _sharded(tmp_path / "m", {"model-00001-of-00001.safetensors": w}, weight_map=wm)
    with pytest.raises(pysafe.ShardIndexError) as info:
        pysafe.Checkpoint.open(d)
    msg = str(info.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in msg and "model-00001-of-00001.safetensors" in msg


def test_index_names_the_wrong_shard(tmp_path):
    w = _weights()
    up, down, norm = list(w)
    d = _sharded(tmp_path / "m", {"model-00001-of-00002.safetensors": {up: w[up], down: w[down]},
                                  "model-00002-of-00002.safetensors": {norm: w[norm]}})
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    wm[up] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(pysafe.ShardIndexError) as info:
        pysafe.Checkpoint.open(d)
    assert "but it is in 'model-00001-of-00002.safetensors'" in str(info.value)


def test_truncated_shard_in_sharded_checkpoint(tmp_path):
    base = _two_shards(tmp_path / "base")
    tuned = _two_shards(tmp_path / "tuned", seed=0)
    shard = tuned / "model-00002-of-00002.safetensors"
    bad_headers.truncate_file(shard, shard.stat().st_size - 7)
    with pytest.raises(pysafe.HeaderError) as info:
        pysafe.compare(base, tuned)
    assert info.value.code == "data_size_mismatch"
    assert str(shard) in str(info.value) and "truncated" in str(info.value)


def test_duplicate_tensor_across_unindexed_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_numpy({"w": np.zeros((2, 2), np.float32)}, str(d / "a.safetensors"))
    save_numpy({"w": np.ones((2, 2), np.float32)}, str(d / "b.safetensors"))
    with pytest.raises(pysafe.CheckpointError, match=r"'w' appears in both a\.safetensors and b\.safetensors"):
        pysafe.Checkpoint.open(d)


# -- PyTorch .bin files ------------------------------------------------------------------------------
class _OpensAFile:
    """Unpickling this would call open(marker, 'w'): weights_only must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_that_is_not_a_pickle(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"this is not a torch checkpoint\n" * 4)
    with pytest.raises(pysafe.CheckpointError) as info:
        pysafe.Checkpoint.open(p)
    assert str(p) in str(info.value) and "weights_only=True" in str(info.value)
    assert "mmap" not in str(info.value)  # not the misleading "save with the zipfile format" hint
    assert "not a PyTorch checkpoint" in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise unsafe loading


def test_bin_with_a_non_tensor_object_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    p = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2, 2), "evil": _OpensAFile(str(marker))}, p)
    d = tmp_path / "model"
    d.mkdir()
    p.rename(d / p.name)
    with pytest.raises(pysafe.CheckpointError) as info:
        pysafe.Checkpoint.open(d)
    assert str(d / p.name) in str(info.value) and "weights_only=True" in str(info.value)
    assert "refused" in str(info.value) and "\x1b[" not in str(info.value)
    assert "weights_only=False" not in str(info.value)
    assert not marker.exists()  # nothing was executed


def test_legacy_non_zip_bin_is_read(tmp_path):
    # pre-1.6 torch.save format: a plain pickle, which torch cannot memory-map
    p = tmp_path / "pytorch_model.bin"
    w = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    torch.save({"w": w}, p, _use_new_zipfile_serialization=False)
    ckpt = pysafe.Checkpoint.open(p)
    assert ckpt.format == "torch"
    np.testing.assert_array_equal(ckpt.read("w"), w.numpy())


# -- pairing and non-finite values -------------------------------------------------------------------
def test_nan_in_a_matrix_is_skipped_and_counted(tmp_path):
    w = _weights()
    t = _perturbed(w)
    name = "model.layers.0.mlp.up_proj.weight"
    t[name][0, 0] = np.nan
    t[name][3, 5] = np.nan
    t[name][7, 1] = np.inf
    cmp = pysafe.compare(_single(tmp_path / "b", w), _single(tmp_path / "t", t))
    reason = _skip_reason(cmp, name)
    assert "NaN/Inf" in reason and reason.startswith("3 ") and "tuned: 3" in reason and "base: 0" in reason
    assert [s["nonfinite"] for s in cmp.skipped if s["name"] == name] == [3]
    analysed = {r["name"] for r in cmp.records}
    assert analysed == {"model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"}
    assert all(np.isfinite(r["delta_fro"]) for r in cmp.records)


def test_inf_in_a_vector_is_skipped(tmp_path):
    w = _weights()
    name = "model.layers.0.input_layernorm.weight"
    w[name][2] = -np.inf  # in the base this time
    cmp = pysafe.compare(_single(tmp_path / "b", w), _single(tmp_path / "t", _perturbed(_weights())))
    reason = _skip_reason(cmp, name)
    assert "NaN/Inf" in reason and "base: 1" in reason and "tuned: 0" in reason
    assert {r["name"] for r in cmp.records} == {"model.layers.0.mlp.up_proj.weight",
                                                "model.layers.0.mlp.down_proj.weight"}


def test_no_common_tensor_names(tmp_path):
    base = _single(tmp_path / "b", {"a.weight": np.ones((2, 2), np.float32)})
    tuned = _single(tmp_path / "t", {"b.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(pysafe.ShapeMismatchError) as info:
        pysafe.compare(base, tuned)
    msg = str(info.value)
    assert "share no tensor names" in msg and "'a.weight'" in msg and "'b.weight'" in msg
    assert isinstance(info.value, ValueError)


def test_shape_mismatch_is_skipped_or_strict_error(tmp_path):
    w = _weights()
    t = _perturbed(w)
    name = "model.layers.0.mlp.down_proj.weight"
    t[name] = np.zeros((16, 25), np.float32)  # a resized dimension
    base, tuned = _single(tmp_path / "b", w), _single(tmp_path / "t", t)
    cmp = pysafe.compare(base, tuned)
    reason = _skip_reason(cmp, name)
    assert reason.startswith("shape mismatch") and "[16, 24]" in reason and "[16, 25]" in reason
    assert cmp.preflight.shape_mismatch == [{"name": name, "base": [16, 24], "tuned": [16, 25]}]
    assert {r["name"] for r in cmp.records} == {"model.layers.0.mlp.up_proj.weight",
                                                "model.layers.0.input_layernorm.weight"}
    with pytest.raises(pysafe.ShapeMismatchError, match=re.escape(name)):
        pysafe.compare(base, tuned, strict=True)


def test_names_only_on_one_side_are_skipped(tmp_path):
    w = _weights()
    t = _perturbed(w)
    t["lm_head.weight"] = np.ones((4, 16), np.float32)
    del t["model.layers.0.input_layernorm.weight"]
    cmp = pysafe.compare(_single(tmp_path / "b", w), _single(tmp_path / "t", t))
    assert _skip_reason(cmp, "lm_head.weight") == "only in tuned"
    assert _skip_reason(cmp, "model.layers.0.input_layernorm.weight") == "only in base"
    assert len(cmp.records) == 2


def test_dtype_difference_is_analysed_and_listed(tmp_path):
    w = _weights()
    base = tmp_path / "b"
    base.mkdir()
    save_torch({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in w.items()}, str(base / "model.safetensors"))
    tuned = _single(tmp_path / "t", _perturbed(w))
    cmp = pysafe.compare(base, tuned)
    assert {r["name"] for r in cmp.records} == set(w)
    assert not cmp.skipped
    rec = cmp.record("model.layers.0.mlp.up_proj.weight")
    assert rec["dtype_base"] == "BF16" and rec["dtype_tuned"] == "F32"
    assert {d["name"] for d in cmp.preflight.dtype_differs} == set(w)
    assert all(d["base"] == "BF16" and d["tuned"] == "F32" for d in cmp.preflight.dtype_differs)
    with pytest.raises(pysafe.ShapeMismatchError, match="differ in dtype"):
        pysafe.compare(base, tuned, strict=True)


def test_3d_tensor_is_skipped_without_a_flattening_rule(tmp_path):
    w = _weights()
    w["model.layers.0.conv.weight"] = np.ones((4, 3, 2), np.float32)
    t = _perturbed(w)
    cmp = pysafe.compare(_single(tmp_path / "b", w), _single(tmp_path / "t", t))
    reason = _skip_reason(cmp, "model.layers.0.conv.weight")
    assert "no flattening rule" in reason and "3-D" in reason and "[4, 3, 2]" in reason
    assert len(cmp.records) == 3
    with pytest.raises(pysafe.ShapeMismatchError, match="no flattening rule"):
        pysafe.compare(tmp_path / "b", tmp_path / "t", strict=True)


@pytest.mark.parametrize("option,value", [("energy", 1.5), ("energy", 0.0), ("rank", 0), ("dtype", "f16"),
                                          ("include", "("), ("base_energy", float("nan"))])
def test_bad_option_values(tmp_path, option, value):
    base, tuned = _single(tmp_path / "b", _weights()), _single(tmp_path / "t", _perturbed(_weights()))
    with pytest.raises(ValueError) as info:
        pysafe.compare(base, tuned, **{option: value})
    assert option in str(info.value) and str(value) in str(info.value)


def test_inputs_are_unchanged_by_compare(tmp_path):
    w = _weights()
    t = _perturbed(w)
    t["model.layers.0.mlp.up_proj.weight"][1, 1] = np.nan  # exercise the skip path too
    base = _two_shards(tmp_path / "base")
    tuned = _single(tmp_path / "tuned", t)
    before = _snapshot(base, tuned)
    cmp = pysafe.compare(base, tuned, save_vectors=True)
    assert cmp.records
    after = _snapshot(base, tuned)
    assert after.keys() == before.keys()  # no file created next to the inputs
    for path, (data, mtime) in before.items():
        assert after[path][0] == data, f"{path} changed"
        assert after[path][1] == mtime, f"{path} mtime changed"


def test_missing_tensor_in_file_is_a_key_error(tmp_path):
    p = tmp_path / "one.safetensors"
    save_numpy({"w": np.zeros((2, 2), np.float32)}, str(p))
    with pytest.raises(pysafe.TensorNotFoundError) as info:
        pysafe._core.SafetensorsFile(str(p)).buffer("nope")
    assert isinstance(info.value, KeyError) and "'nope'" in str(info.value) and str(p) in str(info.value)

"""pysafe._atomic: whole-directory replacement and the one JSON writer."""

import json
import math

import numpy as np
import pytest

from pysafe._atomic import replace_dir, write_json


def _strict(text):
    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_nan_inf_become_null_and_numpy_becomes_python(tmp_path):
    obj = {"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": np.float32(0.25), "d": np.int64(7),
           "e": np.array([1.0, np.nan]), "f": np.bool_(True), "g": (1, 2)}
    write_json(tmp_path / "x.json", obj)
    got = _strict((tmp_path / "x.json").read_text())  # the standard library's strict reading of the file
    assert got == {"a": None, "b": [1.5, None, None], "c": 0.25, "d": 7, "e": [1.0, None], "f": True, "g": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))


def test_write_json_unserialisable_leaves_old_file(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()})
    assert _strict(p.read_text()) == {"ok": 1}


def test_replace_dir_swaps_whole_and_failure_keeps_old(tmp_path):
    out = tmp_path / "d"
    with replace_dir(out) as st:
        (st / "a").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with pytest.raises(FileExistsError, match="already exists"):
        with replace_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with replace_dir(out, overwrite=True) as st:
            (st / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # untouched
    with replace_dir(out, overwrite=True) as st:
        (st / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # nothing of the old directory kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no stage or backup left behind

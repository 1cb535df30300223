"""bench/compare_outputs.py: exact by default; with --rtol, differences within it are tallied per key, not
reported, and anything beyond it still is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np

_spec = importlib.util.spec_from_file_location("compare_outputs",
                                               Path(__file__).resolve().parents[1] / "bench" / "compare_outputs.py")
co = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(co)


def _folder(root: Path, x: float, arr: np.ndarray, k: int) -> Path:
    root.mkdir()
    (root / "a.json").write_text(json.dumps({"rows": [{"sin": [0.5, x], "k": k}], "seconds": x}))
    with h5py.File(root / "r.h5", "w") as f:
        f["m/sv"] = arr
    return root


def test_exact_by_default_and_tolerance_tallied(tmp_path, capsys):
    arr = np.array([3.0, 2.0, 1.0])
    before = _folder(tmp_path / "b", 0.25, arr, 4)
    after = _folder(tmp_path / "a", 0.25 * (1 + 3e-12), arr * (1 + np.array([0, 1e-12, 0])), 4)
    assert co.main([str(before), str(after)]) == 1
    exact = capsys.readouterr().out
    assert "a.json.rows[0].sin[1]: 0.25 != " in exact and "r.h5:m/sv: values differ" in exact
    assert co.main([str(before), str(after), "--rtol", "1e-10"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["differences"] == 0
    tol = summary["tolerated"]
    assert set(tol) == {"a.json.rows[].sin[]", "r.h5:m/sv"}  # "seconds" is ignored, equal values not listed
    assert tol["a.json.rows[].sin[]"]["n"] == 1
    assert 2.9e-12 < tol["a.json.rows[].sin[]"]["max_rel"] < 3.1e-12
    assert 1.9e-12 < tol["r.h5:m/sv"]["max_abs"] < 2.1e-12
    assert co.main([str(before), str(after), "--rtol", "1e-13"]) == 1  # beyond the tolerance: reported
    assert "sin[1]" in capsys.readouterr().out


def test_tolerance_never_hides_a_changed_count(tmp_path, capsys):
    arr = np.array([1.0])
    before, after = _folder(tmp_path / "b", 0.1, arr, 45), _folder(tmp_path / "a", 0.1, arr, 46)
    assert co.main([str(before), str(after), "--rtol", "1e-6"]) == 1
    assert "a.json.rows[0].k: 45 != 46" in capsys.readouterr().out

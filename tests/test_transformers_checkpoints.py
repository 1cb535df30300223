"""Sharded checkpoints written by transformers' save_pretrained, paired across different shardings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import pysafe


def _load_all(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(idx["weight_map"].values())):
        out.update(load_file(str(d / shard)))
    return out, idx


def test_reader_matches_safetensors_library(tiny_llama_pair):
    base_dir, _, _ = tiny_llama_pair
    ref, idx = _load_all(base_dir)
    ck = pysafe.Checkpoint.open(base_dir)
    assert ck.format == "sharded" and len(ck.files) >= 2
    assert set(ck.tensors) == set(idx["weight_map"])
    for name, x in ref.items():
        np.testing.assert_array_equal(ck.read(name, "f64"), x.astype(np.float64))


def test_pairing_across_different_shardings(tiny_llama_pair):
    base_dir, tuned_dir, planted = tiny_llama_pair
    _, bidx = _load_all(base_dir)
    _, tidx = _load_all(tuned_dir)
    assert len(set(tidx["weight_map"].values())) != len(set(bidx["weight_map"].values())) or \
        tidx["weight_map"] != bidx["weight_map"]
    cmp = pysafe.compare(base_dir, tuned_dir, dtype="f64")
    assert cmp.scheme == "llama"
    assert not cmp.skipped
    names = {r["name"] for r in cmp.records}
    assert names == set(bidx["weight_map"])
    base_ref, _ = _load_all(base_dir)
    tuned_ref, _ = _load_all(tuned_dir)
    for r in cmp.records:
        name = r["name"]
        dW = tuned_ref[name].astype(np.float64) - base_ref[name].astype(np.float64)
        assert r["delta_fro"] == pytest.approx(np.linalg.norm(dW), rel=1e-12, abs=1e-15)
        if name in planted:
            assert r["layer"] in (0, 1) and r["module"] in ("gate", "up", "down")
            sv = np.linalg.svd(dW, compute_uv=False)
            np.testing.assert_allclose(r["sv_delta"][:2], sv[:2], rtol=1e-9)
            # the planted rank-2 ΔW (plus f32 rounding) is what fine-tuning changed
            np.testing.assert_allclose(r["sv_delta"][:2], np.linalg.svd(planted[name], compute_uv=False)[:2],
                                       rtol=1e-3)
            assert r["rank_delta"] <= 2
        elif len(r["shape"]) == 2 and "embed" not in name and "lm_head" not in name:
            assert r["module"] in ("q", "k", "v", "o")
            assert r["delta_fro"] == 0.0 and r["rank_delta"] == 0


def test_cli_report_on_transformers_pair(tiny_llama_pair, tmp_path):
    from click.testing import CliRunner

    from pysafe.cli import main

    base_dir, tuned_dir, planted = tiny_llama_pair
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["analyze", str(base_dir), str(tuned_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["format"] == "sharded" and summary["tuned"]["format"] == "sharded"
    mlp = [m for m in summary["matrices"] if m["name"] in planted]
    assert len(mlp) == len(planted) == 6
    assert all(m["delta_rel"] > 0 for m in mlp)
    # per-layer table printed with module columns
    assert "gate" in res.output and "delta_rel" in res.output

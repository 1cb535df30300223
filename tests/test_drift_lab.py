"""pipeline/drift_lab.py: the statistics that test the drift score against measured refusal erosion, and the
weight-space baselines, each against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pysafe.pipeline.drift_lab import baselines, correlation_claim, spearman, versus_baseline_claim


def test_spearman_matches_scipy_with_ties_and_batches():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    xs, ys = rng.normal(size=(7, 10)), rng.normal(size=(7, 10))
    assert np.allclose(spearman(xs, ys), [stats.spearmanr(a, b).statistic for a, b in zip(xs, ys)])
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_correlation_claim_holds_for_a_real_relation_and_not_for_noise():
    rng = np.random.default_rng(1)
    score = rng.normal(size=10)
    related = correlation_claim("r", score, score + 0.3 * rng.normal(size=10), seed=0)
    assert related.holds and related.measured > 0.8 and abs(related.control) < 0.1
    # calibration: with independent erosion the claim must (almost) never hold; 95% interval → ≤ ~5% false
    false = sum(correlation_claim("n", rng.normal(size=10), rng.normal(size=10), seed=s, n_resamples=400).holds
                for s in range(60))
    assert false <= 8, false
    for c in (correlation_claim("c", [1.0, 2, 3], [0.0, 0, 0]), versus_baseline_claim("b", [1.0, 2], [2.0, 1], [0.0, 1])):
        assert not c.holds and c.method.startswith("not computed")  # constant erosion / too few runs


def test_versus_baseline_claim_compares_on_the_same_resamples():
    rng = np.random.default_rng(2)
    erosion = rng.normal(size=12)
    good, noise = erosion + 0.1 * rng.normal(size=12), rng.normal(size=12)
    c = versus_baseline_claim("g", good, noise, erosion, seed=0)
    assert c.holds and c.measured == pytest.approx(stats.spearmanr(good, erosion).statistic)
    assert c.control == pytest.approx(stats.spearmanr(noise, erosion).statistic)
    assert not versus_baseline_claim("same", good, good, erosion, seed=0).holds  # identical scores: no gain


def test_baselines_against_numpy(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    shapes = {"a.weight": (6, 4), "b.weight": (3, 5), "b.bias": (3,)}
    w = {k: {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()} for k in ("base", "al", "tu")}
    for k, d in w.items():
        (tmp_path / k).mkdir()
        save_file(d, str(tmp_path / k / "model.safetensors"))
    got = baselines(tmp_path / "base", tmp_path / "al", tmp_path / "tu")
    mats = ("a.weight", "b.weight")  # 2-D weights only
    f = {k: np.concatenate([w[k][n].astype(np.float64).ravel() for n in mats]) for k in w}
    dT, dA = f["tu"] - f["al"], f["al"] - f["base"]
    assert got["rel_norm_T"] == pytest.approx(np.linalg.norm(dT) / np.linalg.norm(f["al"]), rel=1e-12)
    assert got["cos_TA"] == pytest.approx(dT @ dA / np.linalg.norm(dT) / np.linalg.norm(dA), rel=1e-12)


def test_validate_drift_end_to_end_on_tiny(tmp_path):
    """Three benign variants of a tiny aligned model: trained (and reused on a second call), evaluated, scored
    by pysafe.drift, the claims written; erosion is the aligned refusal rate minus each run's."""
    import json
    from dataclasses import replace

    import pysafe
    from pysafe.lab.config import stage_settings
    from pysafe.lab.train import train
    from pysafe.pipeline.drift_lab import validate_drift

    pre = stage_settings("tiny", "pretrain")
    train("pretrain", tmp_path / "base", model_config=pre.model, recipe=pre.recipe, train_config=replace(pre.train, steps=4))
    ft = stage_settings("tiny", "ssft").train
    train("ssft", tmp_path / "aligned", train_config=replace(ft, steps=4), init=tmp_path / "base")
    variants = (("a", {"lr": 1e-4}), ("b", {"lr": 1e-3, "texts": "unsafe_branch"}), ("c", {"lr": 3e-3, "lora_rank": 2}))
    res = validate_drift(tmp_path / "base", tmp_path / "aligned", tmp_path / "v", preset="tiny", n=16,
                         variants=variants, log=lambda m: None)
    assert [r["name"] for r in res["runs"]] == ["a", "b", "c"]
    for r in res["runs"]:
        assert r["erosion"] == pytest.approx(res["aligned_rates"]["table"]["unsafe_refuse"]
                                             - r["table"]["unsafe_refuse"])
        assert r["drift"]["undo"] == pytest.approx(
            pysafe.drift(tmp_path / "base", tmp_path / "aligned", r["checkpoint"]).summary["model"]["undo"])
        assert json.loads((tmp_path / "v" / "runs" / r["name"] / "config.json").read_text())["stage"] == "benign"
    claims = json.loads((tmp_path / "v" / "claims.json").read_text())
    assert len(claims) == 6 and {c["control_kind"] for c in claims} == {"label_permutation", "baseline"}
    assert all(c["n"] == {"runs": 3} for c in claims)
    mtime = (tmp_path / "v" / "runs" / "a" / "model.safetensors").stat().st_mtime_ns
    logs = []
    validate_drift(tmp_path / "base", tmp_path / "aligned", tmp_path / "v", preset="tiny", n=16, variants=variants,
                   log=logs.append)
    assert "a: finished earlier, reused" in logs
    assert (tmp_path / "v" / "runs" / "a" / "model.safetensors").stat().st_mtime_ns == mtime
    # the aligned model retrained (other weights at the same path): its earlier benign runs are not reused
    stamp = json.loads((tmp_path / "v" / "runs" / "aligned.json").read_text())
    train("ssft", tmp_path / "aligned", train_config=replace(ft, steps=5), init=tmp_path / "base", overwrite=True)
    with pytest.raises(ValueError, match=r"runs/a: a benign run .* trained from another aligned .*remove"):
        validate_drift(tmp_path / "base", tmp_path / "aligned", tmp_path / "v", preset="tiny", n=16,
                       variants=variants, log=logs.append)
    assert json.loads((tmp_path / "v" / "runs" / "aligned.json").read_text()) == stamp  # nothing rewritten
    assert (tmp_path / "v" / "runs" / "a" / "model.safetensors").stat().st_mtime_ns == mtime


def test_shipped_drift_validation_claims_recompute_from_its_numbers():
    """The demo's drift claims are recomputed from the shipped per-run numbers; they equal the claims the
    validation wrote, and each run's erosion is the aligned refusal rate minus the run's."""
    import json

    from pysafe.lab.config import DEMO_DIR
    from pysafe.pipeline.demo import shipped_drift_claims

    doc = json.loads((DEMO_DIR / "drift_validation.json").read_text())
    assert len(doc["runs"]) >= 8
    for r in doc["runs"]:
        assert r["erosion"] == pytest.approx(doc["aligned_rates"]["table"]["unsafe_refuse"] - r["table"]["unsafe_refuse"])
    assert shipped_drift_claims(DEMO_DIR, log=lambda m: None) == doc["claims"]

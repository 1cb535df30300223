"""Activation capture and the Fig 3 cluster analysis on tiny lab models (issue 4, points 1, 3, 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pysafe.analysis.capture import lab_features, pooling_weights
from pysafe.analysis.clusters import auroc, tau_scores
from pysafe.lab.inputs import reference_inputs
from pysafe.pipeline.steps import lab_cluster_analysis as cluster_analysis
from pysafe.cli import main
from pysafe.lab import ckpt as C
from pysafe.lab import data as D
from pysafe.lab.config import load_preset
from pysafe.lab.model import GPT, GPTConfig

RECIPE = D.DataRecipe()


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**load_preset("tiny")["model"], "n_layer": 2})).eval()


@pytest.mark.parametrize("positions", ["eot", "window", "prompt_mean", "last"])
def test_capture_matches_manual_forward(positions):
    """Pooled features = the hook's activations from a plain full-length forward, averaged by hand."""
    m = _model()
    b = D.test_set(RECIPE, "std_safe", 6)
    got = lab_features(m, b.x_safe, b.start_idx, hook="mlp_act", positions=positions, n_window=4, batch_size=4)
    with torch.no_grad():
        _, cap = m(torch.from_numpy(b.x_safe.astype(np.int64)), capture=["mlp_act"])
    for i in range(6):
        s = int(b.start_idx[i])
        sel = {"eot": [s], "window": list(range(s, s + 4)), "prompt_mean": list(range(s + 1)), "last": [s + 3]}[positions]
        for layer in range(2):
            want = cap["mlp_act"][layer][i, sel].mean(0).numpy()
            np.testing.assert_allclose(got[i, layer], want, rtol=1e-5, atol=1e-6)
    assert got.shape == (6, 2, 4 * 32)
    w = pooling_weights(b.start_idx, 159, positions, 4)
    np.testing.assert_allclose(w.sum(1), 1.0)
    with pytest.raises(ValueError, match="hook point"):
        lab_features(m, b.x_safe, b.start_idx, hook="mlp_hidden")


def test_tau_invariants_and_auroc():
    rng = np.random.default_rng(0)
    mu_s, mu_u = rng.standard_normal(16), rng.standard_normal(16)
    tau, ctau, d_s, d_u = tau_scores(np.stack([mu_s, mu_u]), mu_s, mu_u)
    gap = np.linalg.norm(mu_s - mu_u)
    np.testing.assert_allclose(tau, [gap, -gap])  # τ(μ_S) > 0, τ(μ_U) < 0
    assert ctau[0] > 0 > ctau[1]
    assert auroc([2, 3, 4], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 1], [1, 1]) == 0.5
    a, b = rng.standard_normal(300), rng.standard_normal(200) + 0.5
    want = np.mean([[1.0 if x > y else 0.5 if x == y else 0.0 for y in a] for x in b])
    assert auroc(b, a) == pytest.approx(want)


def test_cluster_analysis_schema():
    """The `pysafe clusters` schema on a tiny model: every group, every per-layer list, values in range."""
    m = _model()
    res = cluster_analysis(m, RECIPE, n=24, attack=dict(n_soft=2, n_steps=2), batch_size=16)
    assert res["hook"] == "mlp_act" and res["positions"] == "window" and res["layers"] == [0, 1]
    assert set(res["groups"]) == {"std_safe", "std_unsafe", "jb_co_task", "jb_co_text", "jb_mg_tokens", "jb_mg_text",
                                  "jb_comp", "adv_soft_tokens"}  # named as the lab's test sets
    for g, row in res["groups"].items():
        assert isinstance(row["n"], int) and row["n"] > 0
        for key in ("tau_mean", "tau_std", "cos_tau_mean", "nearest_mean_acc", "silhouette"):
            assert len(row[key]) == 2 and all(np.isfinite(row[key])), (g, key)
        assert all(0 <= v <= 1 for v in row["nearest_mean_acc"]) and all(-1 <= v <= 1 for v in row["silhouette"])
        assert len(row["tau_last"]) == row["n"] and np.mean(row["tau_last"]) == pytest.approx(row["tau_mean"][-1], abs=1e-6)
    # each group holds its set's headline input: std_safe's safe version, std_unsafe's unsafe version
    assert res["groups"]["std_safe"]["n"] == 24 and res["groups"]["std_unsafe"]["n"] == 24
    from pysafe.analysis.clusters import features, reference_means, tau_scores as tau_of

    mu_s, mu_u = reference_means(m, reference_inputs(RECIPE, 24), batch_size=16)
    for g, set_name, variant in (("std_safe", "std_safe", "x_safe"), ("std_unsafe", "std_unsafe", "x_unsafe_target")):
        b = D.test_set(RECIPE, set_name, 24)
        f = features(m, getattr(b, variant), b.start_idx, batch_size=16)
        np.testing.assert_allclose(res["groups"][g]["tau_last"], tau_of(f[:, -1], mu_s[-1], mu_u[-1])[0], rtol=1e-5, atol=1e-5)
    json.dumps(res, allow_nan=False)


def test_cli_clusters(tmp_path):
    m = _model()
    ck = C.save_checkpoint(tmp_path / "ck", m, {"stage": "pretrain", "seed": 0, "data": RECIPE.to_dict()})
    r = CliRunner().invoke(main, ["clusters", str(ck), "--out", str(tmp_path / "cl"), "--n", "12", "--no-attack"])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "cl" / "clusters.json").read_text())
    assert "adv_soft_tokens" not in out["groups"] and (tmp_path / "cl" / "clusters.png").stat().st_size > 0
    r = CliRunner().invoke(main, ["clusters", str(ck), "--out", str(tmp_path / "c3"), "--n", "8",
                                  "--attack-eps", "0.5", "--attack-eps", "1"])
    assert r.exit_code == 0, r.output
    groups = json.loads((tmp_path / "c3" / "clusters.json").read_text())["groups"]
    assert {"adv_soft_tokens", "adv_soft_tokens_eps0.5"} <= set(groups)  # the budget sweep of Fig 7
    r = CliRunner().invoke(main, ["clusters", str(ck), "--out", str(tmp_path / "c2"), "--hook", "nope"])
    assert r.exit_code != 0 and "nope" in r.output and "Traceback" not in r.output


def test_feature_cache_reuses_and_keys(tmp_path):
    from pysafe.analysis.cache import FeatureCache
    from pysafe.analysis.clusters import features

    m = _model()
    b = D.test_set(RECIPE, "std_safe", 10)
    cache = FeatureCache(tmp_path / "f.h5")
    a1 = features(m, b.x_safe, b.start_idx, cache=cache, hook="mlp_act", positions="window")
    a2 = features(m, b.x_safe, b.start_idx, cache=cache, hook="mlp_act", positions="window")
    assert cache.misses == 1 and cache.hits == 1 and np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, lab_features(m, b.x_safe, b.start_idx, hook="mlp_act", positions="window"))
    features(m, b.x_safe, b.start_idx, cache=cache, hook="mlp_act", positions="eot")  # another key
    features(_model(seed=1), b.x_safe, b.start_idx, cache=cache, hook="mlp_act", positions="window")  # other weights
    assert cache.misses == 3
    res1 = cluster_analysis(m, RECIPE, n=8, cache=cache)
    hits = cache.hits
    res2 = cluster_analysis(m, RECIPE, n=8, cache=cache)
    assert cache.hits == hits + 2 + 7 and res1["groups"] == res2["groups"]  # reference (2) + groups (7) reused
    # entries are batched in memory until flush, then read back from the file by a new cache object
    assert not cache.path.exists() and cache.pending  # nothing written yet: below flush_bytes
    cache.flush()
    fresh = FeatureCache(tmp_path / "f.h5")
    np.testing.assert_array_equal(fresh.get_or_compute({"x": 1}, lambda: np.zeros(1)), np.zeros(1))
    b2 = features(m, b.x_safe, b.start_idx, cache=fresh, hook="mlp_act", positions="window")
    assert fresh.hits == 1 and np.array_equal(b2, a1) and not fresh.pending.keys() - {FeatureCache.key({"x": 1})}

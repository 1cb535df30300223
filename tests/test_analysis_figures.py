"""Figs 4-6 on tiny lab models: metric invariants against NumPy, schemas, CLI (issue 4, points 3 and 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pysafe.analysis.lipschitz import lipschitz_analysis, lipschitz_estimates
from pysafe.lab.inputs import safe_unsafe_inputs
from pysafe.analysis.subspaces import column_space, energy_rank, row_scores, row_space, sin_theta
from pysafe.cli import main
from pysafe.lab import ckpt as C
from pysafe.lab import data as D
from pysafe.lab.config import load_preset
from pysafe.lab.model import GPT, GPTConfig

RECIPE = D.DataRecipe()


def _pair(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**load_preset("tiny")["model"], "n_layer": 2})
    base = GPT(cfg).eval()
    tuned = GPT(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, tuned


def test_energy_rank_and_sin_theta_invariants():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 9 / 14) == 1 and energy_rank(s, 1.0) == 3
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    U = Q[:, :10]
    P = U @ U.T
    np.testing.assert_allclose(P @ P, P, atol=1e-12)  # the projector is idempotent
    np.testing.assert_allclose(sin_theta(U, U), 0.0, atol=1e-12)  # inside: 0
    np.testing.assert_allclose(sin_theta(U, Q[:, 10:15]), 1.0, atol=1e-12)  # orthogonal: 1
    v = rng.standard_normal((40, 5))
    v /= np.linalg.norm(v, axis=0)
    st = sin_theta(U, v)
    assert np.all((st >= 0) & (st <= 1))
    np.testing.assert_allclose(st, np.linalg.norm(v - P @ v, axis=0))


def test_row_scores_sum_to_the_norm():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 16))
    a = rng.standard_normal((30, 16))
    for center in (False, True):
        scores, S = row_scores(W, a, center)
        Wc = W - W.mean(0) if center else W
        a_hat = a / np.linalg.norm(a, axis=1, keepdims=True)
        np.testing.assert_allclose((scores ** 2).sum(1), np.linalg.norm(a_hat @ Wc.T, axis=1) ** 2, rtol=1e-10)


def test_column_and_row_space_schema():
    base, tuned = _pair()
    cs = column_space(base, tuned)
    for name in ("c_fc", "c_proj"):
        for row in cs["matrices"][name]:
            assert 0 < row["chance"] < 1 and row["k_base"] >= 1
            for lab in ("tuned", "delta"):
                assert all(0 <= v <= 1 for v in row[lab]["sin_theta"]) and len(row[lab]["sin_theta"]) == row[lab]["k"]
    same = column_space(base, base)
    assert same["matrices"]["c_fc"][0]["tuned"]["mean_sin_theta"] < 1e-6  # W_ST = W_IT: inside its own span
    rs = row_space(base, tuned, safe_unsafe_inputs(RECIPE, 8), top=5)
    for lab in ("base", "tuned", "delta"):
        for row in rs["weights"][lab]:
            assert len(row["safe"]["abs_score_mean"]) == 5 and row["unsafe"]["n"] == 16


def test_lipschitz_batch_invariant_and_matches_autograd():
    base, _ = _pair()
    b = D.test_set(RECIPE, "std_safe", 5)
    est = lipschitz_estimates(base, b.x_safe, b.start_idx, fd_samples=3, batch_size=2)
    est1 = lipschitz_estimates(base, b.x_safe, b.start_idx, fd_samples=3, batch_size=5)
    np.testing.assert_allclose(est["grad"], est1["grad"], rtol=1e-5)
    # by hand for sample 3: the gradient of the top logit at EOT w.r.t. the prompt embeddings 0..s-1
    s = int(b.start_idx[3])
    ids = torch.from_numpy(b.x_safe[3:4, :s + 1].astype(np.int64))
    E = base.transformer.wte(ids).detach().requires_grad_(True)
    z = base(inputs_embeds=E)[0, s].max()
    (g,) = torch.autograd.grad(z, E)
    assert est["grad"][3] == pytest.approx(float(g[0, :s].norm()), rel=1e-5)
    assert np.all(est["fd"] > 0)
    res = lipschitz_analysis(base, safe_unsafe_inputs(RECIPE, 6), fd_samples=2, bins=5)
    for k in ("grad", "fd"):
        r = res["estimates"][k]
        assert len(r["bins"]) == 6 and r["safe"]["n"] == 12 and 0 <= r["auroc_safe_gt_unsafe"] <= 1


def test_cli_figures(tmp_path):
    base, tuned = _pair()
    b = C.save_checkpoint(tmp_path / "b", base, {"stage": "pretrain", "seed": 0, "data": RECIPE.to_dict()})
    t = C.save_checkpoint(tmp_path / "t", tuned, {"stage": "ssft", "seed": 0, "data": RECIPE.to_dict()})
    r = CliRunner()
    for args, name in ((["colspace", str(b), str(t)], "colspace"), (["rowspace", str(b), str(t), "--n", "4"], "rowspace"),
                       (["lipschitz", str(t), "--n", "4", "--fd-samples", "1"], "lipschitz")):
        res = r.invoke(main, [*args, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / name / f"{name}.json").read_text())
        assert (tmp_path / name / f"{name}.png").stat().st_size > 0

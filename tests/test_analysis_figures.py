"""Figs 4-6 on tiny lab models: metric invariants against NumPy, schemas, CLI (issue 4, points 3 and 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pysafe.analysis.lipschitz import lipschitz_analysis, lipschitz_estimates
from pysafe.lab.inputs import safe_unsafe_inputs
from pysafe.analysis.subspaces import column_space, column_space_row, row_scores, row_space
from pysafe.linalg import sin_theta
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


def test_sin_theta_invariants():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    U = Q[:, :10]
    P = U @ U.T
    np.testing.assert_allclose(P @ P, P, atol=1e-12)  # the projector is idempotent
    np.testing.assert_allclose(sin_theta(U, U), 0.0, atol=1e-7)  # inside: 0 (√ of a rounding-level residual)
    np.testing.assert_allclose(sin_theta(U, Q[:, 10:15]), 1.0, atol=1e-12)  # orthogonal: 1
    v = rng.standard_normal((40, 5))
    v /= np.linalg.norm(v, axis=0)
    st = sin_theta(U, v)
    assert np.all((st >= 0) & (st <= 1))
    np.testing.assert_allclose(st, np.linalg.norm(v - P @ v, axis=0), rtol=1e-12)
    st32 = sin_theta(U.astype(np.float32), v.astype(np.float32))  # float32 arithmetic, same values
    np.testing.assert_allclose(st32, st, atol=1e-5)
    with pytest.raises(ValueError, match="same number of rows"):
        sin_theta(U, v[:30])


def _reference_row(Wb, Wt, energy, center, max_k):
    """Fig 4's numbers from NumPy's float64 full SVD, independently of the engine."""
    def svd(W):
        W = W - W.mean(0, keepdims=True) if center else W
        return np.linalg.svd(W, full_matrices=False)

    def k_of(S):
        e = np.cumsum(S ** 2) / np.sum(S ** 2)
        return int(np.argmax(e >= energy) + 1)

    Ub, Sb, _ = svd(Wb)
    kb = k_of(Sb)
    ref = {"k_base": kb}
    for label, M in (("tuned", Wt), ("delta", Wt - Wb)):
        U, S, _ = svd(M)
        k = min(k_of(S), max_k)
        u = U[:, :k]
        ref[label] = (k, np.linalg.norm(u - Ub[:, :kb] @ (Ub[:, :kb].T @ u), axis=0), np.linalg.norm(M))
    return ref, Ub[:, :kb]


@pytest.mark.parametrize("center", [False, True])
def test_column_space_row_matches_a_float64_svd(center):
    """k_IT, k, every sin θ and the random-ΔW control against NumPy's float64 SVD (Fig 4's numbers)."""
    rng = np.random.default_rng(5)
    out_, in_ = 48, 32
    Wb = rng.standard_normal((out_, 12)) @ rng.standard_normal((12, in_)) + 0.1 * rng.standard_normal((out_, in_))
    Wt = Wb + 0.3 * np.outer(rng.standard_normal(out_), rng.standard_normal(in_)) \
        + 0.02 * rng.standard_normal((out_, in_))
    row = column_space_row(Wb, Wt, energy=0.9, center=center, max_k=20, control_draws=4, seed=11)
    ref, Ub_k = _reference_row(Wb, Wt, 0.9, center, 20)
    assert row["k_base"] == ref["k_base"] and 1 < ref["k_base"] < in_
    for label in ("tuned", "delta"):
        k, st, fro = ref[label]
        assert row[label]["k"] == k
        np.testing.assert_allclose(row[label]["sin_theta"], st, rtol=1e-9, atol=1e-12)
        assert row[label]["mean_sin_theta"] == pytest.approx(st.mean(), rel=1e-9)
        assert row[label]["frobenius"] == pytest.approx(fro, rel=1e-12)
    assert 0 < np.mean(ref["delta"][1]) < 1  # ΔW is neither inside nor outside W_IT's span: the test can fail
    # the control: the same seeded draws of R, decomposed by NumPy
    k = ref["tuned"][0]
    rs = np.random.default_rng(11)
    expect = []
    for _ in range(4):
        R = rs.standard_normal(Wb.shape)
        R *= ref["delta"][2] / np.linalg.norm(R)
        W = Wb + R
        W = W - W.mean(0, keepdims=True) if center else W
        u = np.linalg.svd(W, full_matrices=False)[0][:, :k]
        expect.append(np.linalg.norm(u - Ub_k @ (Ub_k.T @ u), axis=0).mean())
    np.testing.assert_allclose(row["random_delta"]["mean_sin_theta"], expect, rtol=1e-9)


def test_row_scores_sum_to_the_norm():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 16))
    a = rng.standard_normal((30, 16))
    for center in (False, True):
        scores, S = row_scores(W, a, center)
        Wc = W - W.mean(0) if center else W
        a_hat = a / np.linalg.norm(a, axis=1, keepdims=True)
        np.testing.assert_allclose((scores ** 2).sum(1), np.linalg.norm(a_hat @ Wc.T, axis=1) ** 2, rtol=1e-10)
    scores, S = row_scores(np.zeros((6, 4)), a[:, :4])  # ΔW = 0 (an unchanged matrix): every score 0
    assert scores.shape == (30, 4) and not scores.any() and S.tolist() == [0.0] * 4


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

"""Claims with intervals and controls that can fail (issue 14, points 4-6): the resampling against SciPy and
a seeded Monte Carlo, the Wilson interval against textbook values and SciPy, negative controls (the
pretrained model against itself, shuffled labels, a random ΔW) and planted effects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

from pysafe.analysis import claims as CL
from pysafe.analysis.subspaces import column_space_row
from pysafe.lab.evaluate import wilson_interval


def _rng_kw(func, seed):
    import inspect

    key = "rng" if "rng" in inspect.signature(func).parameters else "random_state"
    return {key: np.random.default_rng(seed)}


# -- resampling against independent references ------------------------------------------------------------

def test_bootstrap_interval_matches_scipy():
    """Percentile intervals of a difference of means (independent groups) and of a paired mean difference
    agree with scipy.stats.bootstrap's percentile method on the same data (both Monte Carlo: 20,000 each)."""
    rng = np.random.default_rng(0)
    a, b = rng.exponential(1.0, 60), rng.normal(0.3, 1.0, 45)
    mine = CL.percentile_interval(CL.bootstrap_replicates((a, b), CL.mean_diff, n_resamples=20000, rng=1))
    ref = scipy.stats.bootstrap((a, b), lambda x, y, axis: np.mean(x, axis) - np.mean(y, axis), n_resamples=20000,
                                method="percentile", vectorized=True, **_rng_kw(scipy.stats.bootstrap, 2))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert mine == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.03 * width)
    u = rng.normal(0, 1, 50)
    v = u + rng.normal(0.2, 0.3, 50)  # paired: strongly correlated with u
    mine = CL.percentile_interval(CL.bootstrap_replicates((v, u), CL.paired_mean_diff, paired=True,
                                                          n_resamples=20000, rng=3))
    ref = scipy.stats.bootstrap((v, u), lambda x, y, axis: np.mean(x - y, axis), paired=True, n_resamples=20000,
                                method="percentile", vectorized=True, **_rng_kw(scipy.stats.bootstrap, 4))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert mine == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.03 * width)
    # pairing matters here: the unpaired interval is several times wider
    unpaired = CL.percentile_interval(CL.bootstrap_replicates((v, u), CL.mean_diff, n_resamples=4000, rng=5))
    assert unpaired[1] - unpaired[0] > 2.5 * width


@pytest.mark.parametrize("paired", [False, True])
def test_permutation_null_matches_scipy(paired):
    rng = np.random.default_rng(1)
    n = 40
    a, b = rng.normal(0.5, 1, n), rng.normal(0, 1.5, n)
    stat = CL.paired_mean_diff if paired else CL.mean_diff
    mine = CL.permutation_null((a, b), stat, paired=paired, n_resamples=20000, rng=2)
    ref = scipy.stats.permutation_test((a, b), lambda x, y, axis: stat(x, y, axis=axis), vectorized=True,
                                       permutation_type="samples" if paired else "independent", n_resamples=20000,
                                       **_rng_kw(scipy.stats.permutation_test, 3)).null_distribution
    q = [0.025, 0.25, 0.5, 0.75, 0.975]
    np.testing.assert_allclose(np.quantile(mine, q), np.quantile(ref, q), atol=0.04 * ref.std() * 4)
    assert mine.std() == pytest.approx(ref.std(), rel=0.03)


def test_interval_coverage_monte_carlo():
    """A seeded Monte Carlo over 300 data sets from skewed distributions with a known difference of means:
    the interval covers it about 95% of the time (n = 40 per group)."""
    rng = np.random.default_rng(7)
    hits = 0
    reps = 300
    for i in range(reps):
        a, b = rng.exponential(2.0, 40), rng.gamma(2.0, 0.5, 40)  # means 2 and 1
        c = CL.vs_control_samples("t", ("a",), (a,), (b,), lambda x: np.mean(x, axis=-1), kind="pretrained",
                                  side=">", n_resamples=1000, seed=i)
        hits += c.ci95[0] <= 1.0 <= c.ci95[1]
    assert 0.90 <= hits / reps <= 0.985, hits / reps


def test_permutation_claim_error_rates():
    """Under exchangeable labels the claim holds in well under 5% of seeded data sets; with a planted shift of
    one standard deviation (n = 40) it holds in nearly all."""
    rng = np.random.default_rng(11)
    null_holds = sum(CL.vs_permutation("t", ("s", "u"), (rng.normal(0, 1, 40), rng.normal(0, 1, 40)), CL.mean_diff,
                                       n_resamples=500, seed=i).holds for i in range(200))
    assert null_holds <= 10  # 5%
    shift_holds = sum(CL.vs_permutation("t", ("s", "u"), (rng.normal(1, 1, 40), rng.normal(0, 1, 40)), CL.mean_diff,
                                        n_resamples=500, seed=i).holds for i in range(100))
    assert shift_holds >= 90


def test_claim_verdict_and_json():
    c = CL.Claim("x", 1.0, 0.5, "pretrained", ">", 0.5, (0.1, 0.9), {"g": 3})
    assert c.holds and CL.Claim("x", 1.0, 0.5, "pretrained", ">", 0.5, (0.0, 0.9)).holds is False  # touches 0
    assert CL.Claim("x", 1.0, 0.5, "pretrained", "<", 0.5, (0.1, 0.9)).holds is False
    assert CL.Claim("x", 0.0, 0.5, "pretrained", "<", -0.5, (-0.9, -0.1)).holds
    assert not CL.Claim("x", 1e-15, 0.0, "random_delta", ">", 1e-15, (1e-17, 3e-15)).holds  # rounding, not an effect
    nan = CL.Claim("x", float("nan"), None, "none", ">", float("nan"), (float("nan"), float("nan")))
    d = nan.to_json()
    assert d["holds"] is False and d["measured"] is None and d["ci95"] == [None, None]
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError, match="side"):
        CL.Claim("x", 1.0, 0.5, "pretrained", ">=", 0.5, (0.1, 0.9))


# -- the Wilson interval ----------------------------------------------------------------------------------

def test_wilson_against_textbook_and_scipy():
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score interval without correction)
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                             (1, 29): (0.0061, 0.1718)}.items():
        assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=6e-5)
    for n in (1, 7, 20, 500, 2000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ref = scipy.stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError, match="k=5, n=4"):
        wilson_interval(5, 4)


def test_safety_table_carries_intervals():
    """Every rate of the table comes with its Wilson interval at the rate's own n; the attack's column sits
    beside the same inputs unattacked."""
    import torch

    from pysafe.lab import data as D
    from pysafe.lab.config import load_preset
    from pysafe.lab.evaluate import format_table, safety_table
    from pysafe.lab.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**load_preset("tiny")["model"], "n_layer": 1})).eval()
    res = safety_table(m, D.DataRecipe(), sets=["std_safe", "std_unsafe"], n=10, attack=dict(n=4, n_steps=1))
    assert set(res["table"]) == set(res["table_ci95"]) == set(res["table_n"])
    assert {"adv_soft_tokens", "adv_clean"} <= set(res["table"])
    assert res["table"]["adv_clean"] == res["adversarial"]["clean_success"] and res["table_n"]["adv_clean"] == 4
    for col, rate in res["table"].items():
        n = res["table_n"][col]
        ref = scipy.stats.binomtest(round(rate * n), n).proportion_ci(method="wilson")
        assert res["table_ci95"][col] == pytest.approx([ref.low, ref.high], abs=1e-12)
    head = res["sets"]["std_unsafe"]
    assert head["refuse_ci95"] == res["table_ci95"]["unsafe_refuse"]
    text = format_table({"m": res["table"]}, {"m": res["table_ci95"]}, {"m": res["table_n"]})
    assert "adv:clean" in text and "block 1 only" in text and "95% Wilson" in text
    lo, hi = res["table_ci95"]["safe_follow"]
    assert f"[{100 * lo:.1f},{100 * hi:.1f}]" in text.splitlines()[2]
    json.dumps(res["table_ci95"], allow_nan=False)


# -- claims on synthetic analyses: negative controls and planted effects --------------------------------

def _clusters(rng, n, *, sep=0.0, jb=0.0, adv=0.0, grow=0.0):
    groups = {"std_safe": rng.normal(sep / 2, 1, n), "std_unsafe": rng.normal(-sep / 2, 1, n)}
    for g in ("jb_co_task", "jb_co_text", "jb_mg_text"):
        groups[g] = rng.normal(-sep / 2 + jb, 1, n)
    lo = rng.normal(-sep / 2 + adv, 1, n)
    groups["adv_soft_tokens"] = lo + grow / 2 + rng.normal(0, 0.1, n)
    groups["adv_soft_tokens_eps0.5"] = lo
    groups["adv_soft_tokens_eps2"] = lo + grow + rng.normal(0, 0.1, n)
    return {"groups": {g: {"tau_last": v.tolist(), "n": n} for g, v in groups.items()}}


def _figs(rng, n, *, reads=0.0, lip=0.0, minimal=False, delta=True):
    Wb = rng.standard_normal((64, 16)) @ np.diag(np.linspace(3, 0.2, 16)) @ np.linalg.qr(rng.standard_normal((16, 16)))[0]
    if not delta:
        Wt = Wb.copy()
    elif minimal:  # a change inside W_IT's leading column space
        U = np.linalg.svd(Wb, full_matrices=False)[0][:, :4]
        Wt = Wb + 0.3 * U @ rng.standard_normal((4, 16))
    else:  # a random change
        Wt = Wb + 0.3 * rng.standard_normal(Wb.shape) / 8
    row = column_space_row(Wb, Wt, control_draws=20, seed=int(rng.integers(1 << 30)))
    safe = rng.gamma(4, 0.1, n)
    s_lip = rng.lognormal(0, 0.3, n)
    return {"colspace": {"matrices": {"c_fc": [row]}},
            "rowspace": {"weights": {"delta": [{"safe": {"norm_ratio": safe.tolist()},
                                                "unsafe": {"norm_ratio": (safe + reads + rng.normal(0, 0.05, n)).tolist()}}]}},
            "lipschitz": {"estimates": {"grad": {"safe": {"values": s_lip.tolist()},
                                                 "unsafe": {"values": (s_lip * np.exp(-lip) * rng.lognormal(0, 0.1, n)).tolist()}}}}}


def _all_claims(res, figs, weaker=None):
    return CL.cluster_claims(res, weaker or {}, n_resamples=1000) + CL.figure_claims(figs, weaker or {}, n_resamples=1000)


def test_planted_effects_are_detected():
    rng = np.random.default_rng(3)
    n = 200
    pre = _clusters(rng, n)
    res = {"pretrained": pre, "ssft": _clusters(rng, n, sep=1.0, jb=0.6, adv=0.6, grow=0.4),
           "ssft_low": _clusters(rng, n, sep=0.3)}
    figs = {"pretrained": _figs(rng, n), "ssft": _figs(rng, n, reads=0.1, lip=0.4, minimal=True),
            "ssft_low": _figs(rng, n)}
    claims = _all_claims(res, figs, {"ssft": "ssft_low"})
    assert len(claims) == 9  # vs pretrained, vs shuffle, strength, jailbreak, adv, budget; minimal, ΔW reads, Lipschitz
    assert all(c.holds for c in claims), CL.format_claims(claims)
    assert {c.control_kind for c in claims} == {"pretrained", "label_permutation", "lower_rate", "lower_budget",
                                                 "random_delta"}


def test_shuffled_labels_and_random_delta_fail():
    """The same claim code on data without the effect: labels carry nothing, ΔW is random, the fine-tune is the
    pretrained model: no claim holds."""
    rng = np.random.default_rng(5)
    n = 200
    res = {"pretrained": _clusters(rng, n, sep=0.5), "ssft": _clusters(rng, n, sep=0.5)}
    res["ssft"]["groups"]["std_safe"] = res["pretrained"]["groups"]["std_safe"]  # the pretrained model's own
    res["ssft"]["groups"]["std_unsafe"] = res["pretrained"]["groups"]["std_unsafe"]
    # shuffle the labels of the tuned model's points among all groups (sizes kept)
    pooled = np.concatenate([np.asarray(r["tau_last"]) for r in res["ssft"]["groups"].values()])
    pooled = rng.permutation(pooled)
    shuffled, i = {}, 0
    for g, r in res["ssft"]["groups"].items():
        shuffled[g] = {"tau_last": pooled[i:i + len(r["tau_last"])].tolist()}
        i += len(r["tau_last"])
    res["ssft"] = {"groups": shuffled}
    figs = {"pretrained": _figs(rng, n), "ssft": _figs(rng, n)}  # a random ΔW, no planted reading or Lipschitz change
    figs["ssft"]["lipschitz"] = figs["pretrained"]["lipschitz"]
    claims = _all_claims(res, figs)
    assert len(claims) == 8
    assert not any(c.holds for c in claims), CL.format_claims(claims)
    # the pretrained model against itself (ΔW = 0): effects exactly 0, nothing holds
    same = CL.cluster_claims({"pretrained": res["pretrained"], "ssft": res["pretrained"]}, {}, n_resamples=500)
    zero = CL.figure_claims({"pretrained": figs["pretrained"], "ssft": _figs(rng, n, delta=False)}, {}, n_resamples=500)
    assert same[0].effect == 0 and same[0].ci95 == (0.0, 0.0) and not same[0].holds
    # minimal transformation: W_ST = W_IT = the control. The effect is a mean of k directions minus a mean of 20
    # draws of that same mean, so it is 0 up to the rounding of the two means (seen: -2e-31)
    assert abs(zero[0].effect) < 1e-15 and not zero[0].holds


def test_small_samples_widen_the_interval():
    """A weak real effect (0.15 sd) is not claimed at 20 inputs per group but is at 5,000."""
    rng = np.random.default_rng(9)

    def claim(n):
        return CL.vs_permutation("t", ("s", "u"), (rng.normal(0.15, 1, n), rng.normal(0, 1, n)), CL.mean_diff,
                                 n_resamples=1000, seed=0)

    small, large = claim(20), claim(5000)
    assert not small.holds and small.ci95[1] - small.ci95[0] > 0.8
    assert large.holds and large.ci95[1] - large.ci95[0] < 0.2


def test_missing_per_input_values_do_not_hold():
    """A clusters.json without per-input τ (written before the intervals) gives NaN claims, never 'holds'."""
    old = {"groups": {"std_safe": {"tau_mean": [1.0]}, "std_unsafe": {"tau_mean": [-1.0]}}}
    claims = CL.cluster_claims({"pretrained": old, "ssft": old}, {})
    assert claims and not any(c.holds for c in claims)
    assert all(c.to_json()["ci95"] == [None, None] for c in claims)


def test_pretrained_model_against_itself_holds_nothing(tmp_path):
    """The demo's own analyses and claim code, run with the shipped pretrained model as the "fine-tune": every
    claim against the pretrained model, a random ΔW or a label permutation of ΔW's reading fails (the effects are
    exactly 0); the claims that judge one model alone fail once its points' labels are shuffled."""
    from pysafe.lab.config import DEMO_DIR
    from pysafe.pipeline.steps import analyses, cluster_claims, figure_claims

    pre = DEMO_DIR / "pretrain"
    res, figs = analyses({"pretrained": pre, "ssft": pre}, tmp_path, 12, "cpu")
    claims = cluster_claims(res, {}) + figure_claims(figs, {})
    json.dumps(claims, allow_nan=False)
    assert len(claims) == 8 and not any(c["holds"] for c in claims if c["control_kind"] != "label_permutation")
    for c in claims:
        if c["control_kind"] in ("pretrained", "random_delta") or "ΔW" in c["claim"]:
            assert abs(c["effect"]) < 1e-14 and max(map(abs, c["ci95"])) < 1e-14 and not c["holds"], c
    rng = np.random.default_rng(0)
    groups = res["ssft"]["groups"]
    pooled = rng.permutation(np.concatenate([g["tau_last"] for g in groups.values()]))
    cuts = np.cumsum([len(g["tau_last"]) for g in groups.values()])[:-1]
    shuffled = {"groups": {name: {"tau_last": part.tolist()} for name, part in zip(groups, np.split(pooled, cuts))}}
    again = cluster_claims({"pretrained": res["pretrained"], "ssft": shuffled}, {})
    assert len(again) == 5 and not any(c["holds"] for c in again), again

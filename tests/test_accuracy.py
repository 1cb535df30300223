"""The accuracy contract (docs/metrics.md) against independent references.

- every record key of one pair against a float64 full SVD computed here with NumPy, on each of the
  engine's algorithms (exact, gram_eig, block_krylov), high-rank power-law ΔW included;
- the tolerance honoured across spectra, with the reported bounds never below the actual error;
- every chance level against a seeded Monte Carlo over uniformly random subspaces.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.numpy import save_file

import pysafe
from planted import orthonormal
from pysafe.linalg import sin_theta_chance


def spectral_matrix(rng, m, n, sig):
    """m×n matrix with exactly the singular values `sig` (padded with zeros)."""
    d = min(m, n)
    s = np.zeros(d)
    s[: len(sig)] = sig[:d]
    return (orthonormal(rng, m, d) * s) @ orthonormal(rng, n, d).T


def energy_rank(s, energy):
    c = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(c, energy * c[-1] * (1 - 1e-6)) + 1)


# -- every key of a record against a float64 reference ---------------------------------------------
def reference_record(Wb, Wt, kd, kb):
    """All metrics from float64 full SVDs of the stored values (independent of the engine)."""
    dW = Wt - Wb
    Ub, Sb, Vbt = np.linalg.svd(Wb, full_matrices=False)
    Ud, Sd, Vdt = np.linalg.svd(dW, full_matrices=False)
    m, n = dW.shape
    fro2 = float((dW ** 2).sum())
    p = Sd ** 2 / fro2
    p = p[p > 0]
    U, V = Ub[:, :kb], Vbt[:kb].T

    def sines(B, D):
        return np.linalg.norm(D - B @ (B.T @ D), axis=0)

    return {
        "delta_fro": math.sqrt(fro2), "base_fro": float(np.linalg.norm(Wb)),
        "delta_rel": math.sqrt(fro2) / float(np.linalg.norm(Wb)),
        "rank_delta": kd, "rank_base": kb, "sv_delta": Sd, "sv_base": Sb,
        "energy_topk_delta": float((Sd[:kd] ** 2).sum() / fro2),
        "svd_tail_rel": math.sqrt(max(0.0, 1 - (Sd[:kd] ** 2).sum() / fro2)),
        "stable_rank_delta": fro2 / Sd[0] ** 2,
        "effective_rank_delta": float(np.exp(-(p * np.log(p)).sum())),
        "energy_rank_50_delta": energy_rank(Sd, 0.5), "energy_rank_90_delta": energy_rank(Sd, 0.9),
        "energy_rank_99_delta": energy_rank(Sd, 0.99),
        "null_frac_left": float(((dW - U @ (U.T @ dW)) ** 2).sum() / fro2),
        "null_frac_right": float(((dW - (dW @ V) @ V.T) ** 2).sum() / fro2),
        "sin_theta_left": sines(U, Ud[:, :kd]), "sin_theta_right": sines(V, Vdt[:kd].T),
        "overlap_left": float(np.linalg.norm(U.T @ Ud[:, :kd]) ** 2 / min(kb, kd)),
        "overlap_right": float(np.linalg.norm(V.T @ Vdt[:kd].T) ** 2 / min(kb, kd)),
        # chance levels: for sin θ by numerical integration over sin²θ ~ Beta((d−k)/2, k/2); the
        # closed forms of null_frac and overlap are checked by Monte Carlo below
        "sin_theta_left_chance": _beta_sqrt_mean(m, kb), "sin_theta_right_chance": _beta_sqrt_mean(n, kb),
        "null_frac_left_chance": 1 - kb / m, "null_frac_right_chance": 1 - kb / n,
        "overlap_left_chance": max(kb, kd) / m, "overlap_right_chance": max(kb, kd) / n,
        "out_features": m, "in_features": n, "nonfinite": 0,
    }


def _beta_sqrt_mean(d, k):
    from scipy.stats import beta

    return float(beta((d - k) / 2, k / 2).expect(np.sqrt))


# keys that describe how a number was obtained (checked for presence and type, not value)
DESCRIPTIVE = {"name", "layer", "module", "shape", "stored_shape", "transposed", "dtype_base", "dtype_tuned",
               "time_read_delta", "time_svd_delta", "time_svd_base", "time_metrics", "svd_method",
               "svd_method_delta", "svd_method_base", "effective_rank_from", "svd_sketch_passes",
               "svd_iterations_delta", "svd_iterations_base", "tol", "tol_base", "tol_reached_delta",
               "tol_reached_base",
               "energy_reached_delta", "energy_reached_base", "svd_flops_delta", "svd_flops_base"}
# error bars: each must cover the actual error of its value
BOUNDS = {"svd_rel_error", "svd_rel_error_delta", "svd_rel_error_base", "effective_rank_delta_err",
          "stable_rank_delta_err"}


CASES = {
    # name: (ΔW spectrum, compare() options, expected method for ΔW)
    "exact_lowrank": ("lowrank", {}, "exact"),
    "exact_powerlaw": ("powerlaw", {}, "exact"),
    "gram_powerlaw": ("powerlaw", {"exact_max_dim": 0}, "gram_eig"),
    "krylov_powerlaw": ("powerlaw", {"exact_max_dim": 0, "rank": 8, "base_rank": 12, "spectrum": "none"},
                        "block_krylov"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_record_key_against_float64_reference(tmp_path, case):
    spectrum, opts, method = CASES[case]
    rng = np.random.default_rng(11)
    m, n = 260, 180
    Wb = spectral_matrix(rng, m, n, np.r_[np.geomspace(3, 0.3, 20), np.full(160, 0.05)])
    if spectrum == "lowrank":
        dW = spectral_matrix(rng, m, n, [0.5, 0.3, 0.2, 0.1])
    else:  # high rank: σ_i ∝ i^-0.6, as a full fine-tune
        dW = spectral_matrix(rng, m, n, 0.3 * np.arange(1, n + 1) ** -0.6)
    # float16 storage: tuned − base is then exact in float32, so the reference and the engine
    # decompose the same ΔW
    save_file({"w": Wb.astype(np.float16)}, str(tmp_path / "b.safetensors"))
    save_file({"w": (Wb + dW).astype(np.float16)}, str(tmp_path / "t.safetensors"))
    sb = Wb.astype(np.float16).astype(np.float64)
    st = (Wb + dW).astype(np.float16).astype(np.float64)
    rec = pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", **opts).record("w")
    assert rec["svd_method_delta"] == method and rec["svd_method"] == method
    kd, kb = rec["rank_delta"], rec["rank_base"]
    ref = reference_record(sb, st, kd, kb)
    sd_ref = ref["sv_delta"]
    if "rank" not in opts:  # the energy rule on the exact spectra
        assert kd == energy_rank(sd_ref, 0.9)
        assert kb == energy_rank(ref["sv_base"], 0.9)
    tol = rec["tol"]
    assert tol == 1e-4
    checked = set()

    def close(key, rel, abs_=0.0):
        assert rec[key] == pytest.approx(ref[key], rel=rel, abs=abs_), (key, rec[key], ref[key])
        checked.add(key)

    for key in ("delta_fro", "base_fro", "delta_rel", "out_features", "in_features", "nonfinite", "rank_delta",
                "rank_base"):
        close(key, 1e-6)
    for key in ("sin_theta_left_chance", "sin_theta_right_chance", "null_frac_left_chance",
                "null_frac_right_chance", "overlap_left_chance", "overlap_right_chance"):
        close(key, 1e-8)
    # metrics of the singular vectors: exact to rounding on the exact paths; block Krylov's
    # stopping rule is on the values (error ~ residual²/gap), its vectors converge like √tol
    vec_tol = 2e-3 if method == "block_krylov" else 1e-5
    close("energy_topk_delta", 1e-4, 1e-6)
    for key in ("null_frac_left", "null_frac_right", "overlap_left", "overlap_right"):
        close(key, 0, vec_tol)
    close("svd_tail_rel", 1e-3, 1e-6)
    # the spectra: the whole spectrum when computed, else the kept top k
    for key, k in (("sv_delta", kd), ("sv_base", kb)):
        got = np.asarray(rec[key])
        full = rec["effective_rank_from"] == "full_spectrum" if key == "sv_delta" else got.size == min(m, n)
        want = ref[key] if full else ref[key][:k]
        assert got.size == want.size, key
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * want[0], err_msg=key)
        checked.add(key)
    for key in ("sin_theta_left", "sin_theta_right"):
        np.testing.assert_allclose(rec[key], ref[key], rtol=0, atol=max(vec_tol, 1e-4), err_msg=key)
        checked.add(key)
    # the top-k singular values meet the tolerance, and the reported bound covers the actual error
    for side, sv, k in (("delta", rec["sv_delta"], kd), ("base", rec["sv_base"], kb)):
        actual = np.abs(np.asarray(sv[:k]) - ref["sv_" + side][:k]) / np.asarray(sv[:k])
        assert rec["tol_reached_" + side] is True
        big = np.asarray(sv[:k]) >= 0.05 * sv[0]  # above any working-precision floor at this size
        assert np.all(actual[big] <= tol), side
        assert np.all(actual[big] <= rec["svd_rel_error_" + side] * 1.0001 + 1e-12), side
    # stable rank: from σ_1, always; its error bar covers the actual error
    close("stable_rank_delta", 1e-4)
    assert abs(rec["stable_rank_delta"] - ref["stable_rank_delta"]) <= rec["stable_rank_delta_err"] + 1e-12
    # spectrum-wide metrics: exact (with an error bar that covers the error) or not reported at all
    spectrum_keys = ("effective_rank_delta", "energy_rank_50_delta", "energy_rank_90_delta", "energy_rank_99_delta")
    if rec["effective_rank_from"] == "full_spectrum":
        close("effective_rank_delta", 1e-5)
        assert abs(rec["effective_rank_delta"] - ref["effective_rank_delta"]) <= rec["effective_rank_delta_err"]
        for key in spectrum_keys[1:]:
            close(key, 0)
    else:
        assert rec["effective_rank_from"] == "not_computed" and case.startswith("krylov")
        for key in spectrum_keys + ("effective_rank_delta_err",):
            assert math.isnan(rec[key]), key
    checked |= set(spectrum_keys) | BOUNDS
    for key in DESCRIPTIVE:
        assert key in rec, key
    # computed here, not read from the base-decomposition cache (which tests/test_base_cache.py covers)
    assert rec["base_svd_cached"] in (False, 0)
    checked.add("base_svd_cached")
    unknown = set(rec) - checked - DESCRIPTIVE
    assert not unknown, f"record keys without a reference check: {sorted(unknown)}"


# -- the tolerance across spectra ------------------------------------------------------------------
SPECTRA = {
    "flat": lambda d: np.ones(d),
    "powerlaw_0.3": lambda d: np.arange(1, d + 1) ** -0.3,
    "powerlaw_0.6": lambda d: np.arange(1, d + 1) ** -0.6,
    "powerlaw_1.0": lambda d: np.arange(1, d + 1) ** -1.0,
    "powerlaw_1.5": lambda d: np.arange(1, d + 1) ** -1.5,
    "exactly_rank_5": lambda d: np.r_[np.linspace(3, 1, 5), np.zeros(d - 5)],  # k = 8 > rank
    "rank_deficient": lambda d: np.r_[np.arange(1, d // 2 + 1) ** -0.5, np.zeros(d - d // 2)],
    "tiny_gaps": lambda d: np.r_[1 - 1e-7 * np.arange(12), 0.5 * np.arange(1, d - 11) ** -0.5],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_tolerance_honoured_across_spectra(name, dtype):
    rng = np.random.default_rng(sorted(SPECTRA).index(name))
    m, n = 300, 220
    A = spectral_matrix(rng, m, n, SPECTRA[name](n)).astype(dtype)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    for opts in ({"rank": 8, "exact_max_dim": 0}, {"energy": 0.9, "exact_max_dim": 0}, {"rank": 8}):
        _, S, _, info = pysafe.truncated_svd(A, **opts)
        k = info["k"]
        assert info["tol_reached"], (name, opts, info["method"], info["rel_error"])
        err = np.abs(S[:k].astype(np.float64) - ref[:k])
        # the per-value bounds are never below the actual error (give or take the float64
        # reference's own rounding, which matters for the float64 runs only)
        ref_err = math.sqrt(m + n) * np.finfo(np.float64).eps * ref[0]
        assert np.all(err <= np.asarray(info["err"]) * 1.0001 + ref_err), (name, opts, info["method"])
        # relative tol on every value above the working-precision floor; absolute below it
        floor = max(0.05 * ref[0], 1e-300)
        assert np.all(err <= 1e-4 * np.maximum(ref[:k], floor)), (name, opts, info["method"])
        if "energy" in opts:
            assert info["method"] == "gram_eig" and k == energy_rank(ref, 0.9) and info["energy_reached"]
            np.testing.assert_allclose(info["spectrum"], ref, rtol=0, atol=1e-4 * ref[0])
        elif "exact_max_dim" in opts:
            assert info["method"] in ("block_krylov", "gram_eig", "exact")


def _bk_spectrum(rng, kind, d):
    if kind == "gaussian":  # flat near the top: Marchenko–Pastur edge, no gap at k
        return None
    if kind == "powerlaw":
        return np.arange(1, d + 1) ** -rng.uniform(0.3, 1.5)
    if kind == "lowrank":
        r = int(rng.integers(20, 60))
        return np.r_[np.geomspace(3, 1, r), np.zeros(d - r)]
    # "cluster": many values within 1e-6 of each other at the top, then a decay
    c = int(rng.integers(5, 40))
    return np.r_[1 - 1e-6 * rng.random(c), 0.8 * np.arange(1, d - c + 1) ** -0.5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_krylov_bound_contains_the_true_values(dtype):
    """Seeded, many matrices: the certified interval [σ̂_i, σ̂_i + err_i] of every reported value
    contains the float64 singular value, the tolerance asked for is met, and the record names the
    method: block Krylov, or gram_eig where the iteration would cost more (small matrices whose
    Krylov basis would pass half their short side)."""
    rng = np.random.default_rng(1234)
    methods = {}
    for trial in range(16):
        kind = ("gaussian", "powerlaw", "lowrank", "cluster")[trial % 4]
        m, n = int(rng.integers(150, 320)), int(rng.integers(150, 320))
        d = min(m, n)
        sig = _bk_spectrum(rng, kind, d)
        A = rng.standard_normal((m, n)) if sig is None else spectral_matrix(rng, m, n, sig)
        A = A.astype(dtype)
        ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
        k = int(rng.integers(1, 30))
        tol = (1e-2, 1e-3, 1e-4)[trial % 3]
        _, S, _, info = pysafe.truncated_svd(A, rank=k, tol=tol, exact_max_dim=0, seed=trial)
        methods[info["method"]] = methods.get(info["method"], 0) + 1
        assert info["tol_reached"], (kind, m, n, k, tol, info["method"], info["rel_error"])
        S = S[:k].astype(np.float64)
        err = np.asarray(info["err"])
        slack = math.sqrt(m + n) * np.finfo(dtype).eps * ref[0]  # the float64 reference's and T's rounding
        assert np.all(np.abs(S - ref[:k]) <= err + slack), (kind, m, n, k, tol, info["method"])
        floor = max(0.05 * ref[0], 1e-300)
        assert np.all(np.abs(S - ref[:k]) <= tol * np.maximum(ref[:k], floor) + slack), (kind, k, tol)
        if info["method"] == "block_krylov":  # Ritz values never exceed the singular values they estimate
            assert np.all(S <= ref[:k] * (1 + 1e-6) + slack)
    assert set(methods) <= {"block_krylov", "gram_eig"} and methods.get("block_krylov", 0) >= 10, methods


def test_block_krylov_cost_follows_the_tolerance():
    """A looser --tol is a cheaper, still certified run, also on a flat (Gaussian) spectrum."""
    rng = np.random.default_rng(8)
    A = rng.standard_normal((700, 600)).astype(np.float32)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    runs = {}
    for tol in (1e-1, 1e-2, 1e-4):
        _, S, _, info = pysafe.truncated_svd(A, rank=16, tol=tol, exact_max_dim=0)
        assert info["method"] == "block_krylov" and info["tol_reached"], (tol, info["method"])
        assert np.all(np.abs(S[:16] - ref[:16]) <= tol * ref[:16])
        runs[tol] = info
    assert runs[1e-1]["flops"] < runs[1e-2]["flops"] < runs[1e-4]["flops"]
    assert runs[1e-1]["iterations"] < runs[1e-2]["iterations"] < runs[1e-4]["iterations"]
    # a fixed number of power iterations is subspace iteration, reporting the bound it reaches
    _, _, _, fixed = pysafe.truncated_svd(A, rank=16, power_iters=1, exact_max_dim=0)
    assert fixed["method"] == "subspace_iteration" and fixed["iterations"] == 2 and fixed["flops"] > 0


def test_base_tol_loosens_w_base_alone(tmp_path):
    """--base-tol: W_base's values are held to their own bound (checked against a float64 SVD), at
    less cost, and ΔW's side (values, bound, tol) is what the single --tol gives."""
    rng = np.random.default_rng(21)
    m, n = 1100, 800
    Wb = rng.standard_normal((m, n)) * 0.05  # flat at the top: where the base's iterations go
    dW = spectral_matrix(rng, m, n, 0.01 * np.arange(1, n + 1) ** -0.6)
    save_file({"w": Wb.astype(np.float16)}, str(tmp_path / "b.safetensors"))
    save_file({"w": (Wb + dW).astype(np.float16)}, str(tmp_path / "t.safetensors"))
    sb = Wb.astype(np.float16).astype(np.float64)
    sd = (Wb + dW).astype(np.float16).astype(np.float64) - sb
    ref_b = np.linalg.svd(sb, compute_uv=False)
    ref_d = np.linalg.svd(sd, compute_uv=False)
    opts = dict(rank=8, base_rank=24, exact_max_dim=0, spectrum="none", cache=None)
    one = pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", **opts).record("w")
    two = pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", base_tol=3e-2, **opts).record("w")
    assert (one["tol"], one["tol_base"]) == (1e-4, 1e-4)
    assert (two["tol"], two["tol_base"]) == (1e-4, 3e-2)
    for rec, tol_b in ((one, 1e-4), (two, 3e-2)):
        assert rec["tol_reached_base"] is True
        err_b = np.abs(np.asarray(rec["sv_base"][:24]) - ref_b[:24]) / ref_b[:24]
        assert np.all(err_b <= tol_b) and np.all(err_b <= rec["svd_rel_error_base"] * 1.0001)
        err_d = np.abs(np.asarray(rec["sv_delta"][:8]) - ref_d[:8]) / ref_d[:8]
        assert rec["tol_reached_delta"] is True and np.all(err_d <= 1e-4)
    # at 1e-4 the flat top needs more Krylov blocks than the whole spectrum costs (gram_eig); at 3e-2
    # a few blocks certify it
    assert two["svd_method_base"] == "block_krylov" and two["svd_rel_error_base"] > one["svd_rel_error_base"]
    assert two["svd_flops_base"] < one["svd_flops_base"]
    np.testing.assert_array_equal(two["sv_delta"], one["sv_delta"])
    assert two["svd_rel_error_delta"] == one["svd_rel_error_delta"]
    with pytest.raises(ValueError, match="base_tol must be in"):
        pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", base_tol=1.5, **opts)


def test_randomized_path_on_a_matrix_above_the_exact_limit():
    """min(m, n) > 1024 at the default exact_max_dim: block Krylov to tol on a power law."""
    rng = np.random.default_rng(3)
    m, n = 1100, 1030
    sig = np.arange(1, n + 1) ** -0.6
    G1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    G2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = ((G1 * sig) @ G2.T).astype(np.float32)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    _, S, _, info = pysafe.truncated_svd(A, rank=8)
    assert info["method"] == "block_krylov" and info["tol_reached"]
    np.testing.assert_allclose(S[:8], ref[:8], rtol=1e-4)
    assert np.all(np.abs(S[:8] - ref[:8]) <= np.asarray(info["err"]) * 1.0001)
    # a user-fixed iteration count is obeyed, and the record says the bound it reaches
    _, S1, _, one = pysafe.truncated_svd(A, rank=8, power_iters=0)
    assert one["method"] == "subspace_iteration" and one["iterations"] == 1 and one["rel_error"] >= np.max(np.abs(S1[:8] - ref[:8]) / S1[:8])
    # an explicit max_rank caps the energy rule and says so
    _, _, _, capped = pysafe.truncated_svd(A[:300, :200], energy=0.9, max_rank=20, exact_max_dim=0)
    assert capped["k"] == 20 and capped["energy_reached"] is False and capped["method"] == "gram_eig"


# -- chance levels against Monte Carlo -------------------------------------------------------------
def random_basis(rng, d, k):
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


@pytest.mark.parametrize("side", ["left", "right"])
def test_chance_levels_of_a_record_against_monte_carlo(tmp_path, side):
    """Each *_chance of a record is the mean of its statistic over uniformly random base subspaces
    of the same dimension and k (and, for sin θ and overlap, random ΔW subspaces of the same k)."""
    rng = np.random.default_rng(21)
    m, n = 36, 28
    Wb = spectral_matrix(rng, m, n, np.geomspace(4, 0.1, n))
    dW = spectral_matrix(rng, m, n, 0.2 * np.arange(1, n + 1) ** -0.6)
    save_file({"w": Wb.astype(np.float32)}, str(tmp_path / "b.safetensors"))
    save_file({"w": (Wb + dW).astype(np.float32)}, str(tmp_path / "t.safetensors"))
    rec = pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=5, base_rank=7).record("w")
    kd, kb = rec["rank_delta"], rec["rank_base"]
    d = m if side == "left" else n
    D = dW.astype(np.float32).astype(np.float64)
    D = D if side == "left" else D.T
    draws = 4000
    sin_mean, null, overlap = np.empty(draws), np.empty(draws), np.empty(draws)
    for t in range(draws):
        Ub, Ud = random_basis(rng, d, kb), random_basis(rng, d, kd)
        sin_mean[t] = np.linalg.norm(Ud - Ub @ (Ub.T @ Ud), axis=0).mean()
        null[t] = ((D - Ub @ (Ub.T @ D)) ** 2).sum() / (D ** 2).sum()
        overlap[t] = np.linalg.norm(Ub.T @ Ud) ** 2 / min(kb, kd)
    for key, x in (("sin_theta", sin_mean), ("null_frac", null), ("overlap", overlap)):
        mc, se = x.mean(), x.std(ddof=1) / math.sqrt(draws)
        assert abs(rec[f"{key}_{side}_chance"] - mc) <= 4 * se, (key, rec[f"{key}_{side}_chance"], mc, se)
    # the test can tell: 1 − k/d, the old sin θ chance (that of sin² θ), is far outside the MC error
    assert abs((1 - kb / d) - sin_mean.mean()) > 10 * sin_mean.std(ddof=1) / math.sqrt(draws)


@pytest.mark.parametrize("n,k", [(8, 1), (64, 8), (512, 100), (4096, 256), (11008, 1139), (5, 4)])
def test_sin_theta_chance_against_monte_carlo(n, k):
    """E[sin θ] against sampling: ‖(I − P)u‖² of a uniform unit u is χ²_{n−k} / (χ²_{n−k} + χ²_k)."""
    rng = np.random.default_rng(n * 7919 + k)
    draws = 200_000
    a, b = rng.chisquare(n - k, draws), rng.chisquare(k, draws)
    x = np.sqrt(a / (a + b))
    mc, se = x.mean(), x.std(ddof=1) / math.sqrt(draws)
    assert abs(sin_theta_chance(n, k) - mc) <= 4 * se
    assert sin_theta_chance(n, 0) == 1.0 and sin_theta_chance(n, n) == 0.0
    with pytest.raises(ValueError, match="n=3, k=4"):
        sin_theta_chance(3, 4)

"""Every metric of engine.md §5 against a float64 NumPy reference written here, on planted matrices."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from scipy.stats import beta as beta_dist

import pysafe
from planted import orthonormal


# -- the independent reference (float64 NumPy, full SVDs) -------------------------------------------
def energy_rank(s, energy):
    c = np.cumsum(s ** 2)
    return int(np.searchsorted(c, energy * c[-1] * (1 - 1e-9)) + 1)


def reference(Wb, Wt, *, rank=None, energy=0.9, base_rank=None, base_energy=0.9, center=False):
    Wb = Wb.astype(np.float64)
    dW = Wt.astype(np.float64) - Wb
    out = {"delta_fro": np.linalg.norm(dW), "delta_rel": np.linalg.norm(dW) / np.linalg.norm(Wb)}
    if center:
        Wb = Wb - Wb.mean(axis=0, keepdims=True)
        dW = dW - dW.mean(axis=0, keepdims=True)
    Ub, Sb, Vbt = np.linalg.svd(Wb, full_matrices=False)
    Ud, Sd, Vdt = np.linalg.svd(dW, full_matrices=False)
    kb = base_rank or energy_rank(Sb, base_energy)
    kd = rank or energy_rank(Sd, energy)
    m, n = dW.shape
    U, V = Ub[:, :kb], Vbt[:kb].T
    fro2 = (dW ** 2).sum()
    out.update(
        rank_base=kb, rank_delta=kd, sv_delta=Sd, sv_base=Sb,
        energy_topk_delta=(Sd[:kd] ** 2).sum() / fro2,
        stable_rank_delta=fro2 / Sd[0] ** 2,
        effective_rank_delta=np.exp(-np.sum((p := Sd ** 2 / fro2)[p > 0] * np.log(p[p > 0]))),
        null_frac_left=((dW - U @ (U.T @ dW)) ** 2).sum() / fro2,
        null_frac_right=((dW - (dW @ V) @ V.T) ** 2).sum() / fro2,
        null_frac_left_chance=1 - kb / m, null_frac_right_chance=1 - kb / n,
        sin_theta_left=np.linalg.norm(Ud[:, :kd] - U @ (U.T @ Ud[:, :kd]), axis=0),
        overlap_left=(np.linalg.svd(U.T @ Ud[:, :kd], compute_uv=False) ** 2).sum() / min(kb, kd),
        overlap_right=(np.linalg.svd(V.T @ Vdt[:kd].T, compute_uv=False) ** 2).sum() / min(kb, kd),
    )
    return out


def planted_base(rng, m, n, top=(10, 9, 8, 7, 6, 5), floor=0.01):
    """W_b with known singular values: a few large ones, the rest `floor`."""
    r = min(m, n)
    s = np.full(r, floor)
    s[: len(top)] = top
    U, V = orthonormal(rng, m, r), orthonormal(rng, n, r)
    return U, s, V, (U * s) @ V.T


def write_pair(tmp_path, Wb, Wt, name="w", dtype=np.float32):
    save_file({name: Wb.astype(dtype)}, str(tmp_path / "base.safetensors"))
    save_file({name: Wt.astype(dtype)}, str(tmp_path / "tuned.safetensors"))
    stored_b = Wb.astype(dtype).astype(np.float64)
    stored_t = Wt.astype(dtype).astype(np.float64)
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", stored_b, stored_t


SCALARS = ["delta_fro", "delta_rel", "energy_topk_delta", "stable_rank_delta", "effective_rank_delta",
           "null_frac_left", "null_frac_right", "null_frac_left_chance", "null_frac_right_chance",
           "overlap_left", "overlap_right"]


def check_against_reference(rec, ref, rtol, atol):
    assert rec["rank_delta"] == ref["rank_delta"]
    assert rec["rank_base"] == ref["rank_base"]
    for key in SCALARS:
        assert rec[key] == pytest.approx(ref[key], rel=rtol, abs=atol), key
    kd = ref["rank_delta"]
    np.testing.assert_allclose(rec["sv_delta"][:kd], ref["sv_delta"][:kd], rtol=rtol, atol=atol)
    np.testing.assert_allclose(rec["sin_theta_left"], ref["sin_theta_left"], rtol=rtol, atol=max(atol, 1e-4))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_dense_exact_matches_reference(tmp_path, dtype):
    rng = np.random.default_rng(0)
    m, n = 60, 40
    _, _, _, Wb = planted_base(rng, m, n)
    dW = 0.05 * rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) + 1e-4 * rng.standard_normal((m, n))
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    rec = pysafe.compare(bp, tp, dtype=dtype).record("w")
    assert rec["svd_method"] == "exact" and rec["nonfinite"] == 0
    tol = 1e-10 if dtype == "f64" else 2e-4
    check_against_reference(rec, reference(sb, st), rtol=tol, atol=tol)
    assert rec["null_frac_left_chance"] == pytest.approx(1 - rec["rank_base"] / m)
    assert rec["overlap_left_chance"] == pytest.approx(max(rec["rank_base"], rec["rank_delta"]) / m)
    # E[sin θ] by numerical integration over sin² θ ~ Beta((m − k)/2, k/2) (closed form in the engine)
    kb = rec["rank_base"]
    assert rec["sin_theta_left_chance"] == pytest.approx(beta_dist((m - kb) / 2, kb / 2).expect(np.sqrt), rel=1e-8)


def test_known_singular_values_and_fixed_ranks(tmp_path):
    rng = np.random.default_rng(1)
    m, n = 80, 50
    _, _, _, Wb = planted_base(rng, m, n)
    sigma = np.array([3.0, 2.0, 1.0, 0.5])
    dW = (orthonormal(rng, m, 4) * sigma) @ orthonormal(rng, n, 4).T
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    rec = pysafe.compare(bp, tp, dtype="f64", rank=3, base_rank=5).record("w")
    np.testing.assert_allclose(rec["sv_delta"][:4], sigma, rtol=1e-10)
    np.testing.assert_allclose(rec["sv_delta"][4:], 0, atol=1e-10)
    assert rec["rank_delta"] == 3 and rec["rank_base"] == 5
    np.testing.assert_allclose(rec["sv_base"][:6], [10, 9, 8, 7, 6, 5], rtol=1e-10)
    assert rec["energy_topk_delta"] == pytest.approx((9 + 4 + 1) / (9 + 4 + 1 + 0.25), rel=1e-10)
    assert rec["stable_rank_delta"] == pytest.approx((9 + 4 + 1 + 0.25) / 9, rel=1e-10)
    check_against_reference(rec, reference(sb, st, rank=3, base_rank=5), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("placement,expected", [("inside", 0.0), ("null", 1.0)])
def test_null_fraction_of_planted_delta(tmp_path, placement, expected):
    """ΔW inside W_b's top-k column space -> null_frac_left ≈ 0; inside its null space -> ≈ 1."""
    rng = np.random.default_rng(2)
    m, n = 64, 48
    U, s, V, Wb = planted_base(rng, m, n)
    kb = 6  # the six large singular values of W_b
    if placement == "inside":
        dW = U[:, :kb] @ rng.standard_normal((kb, n)) * 1e-2
    else:
        dW = U[:, kb:] @ rng.standard_normal((U.shape[1] - kb, n)) * 1e-2
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    for dtype, tol in (("f64", 1e-9), ("f32", 1e-4)):
        rec = pysafe.compare(bp, tp, dtype=dtype, base_rank=kb).record("w")
        assert rec["rank_base"] == kb
        assert rec["null_frac_left"] == pytest.approx(expected, abs=tol)
        assert rec["null_frac_left_chance"] == pytest.approx(1 - kb / m)
        assert np.all(np.asarray(rec["sin_theta_left"]) == pytest.approx(expected, abs=max(tol, 1e-3)))
        ref = reference(sb, st, base_rank=kb)
        assert rec["null_frac_left"] == pytest.approx(ref["null_frac_left"], abs=tol)


def test_null_fraction_right_side(tmp_path):
    rng = np.random.default_rng(3)
    m, n = 40, 64
    U, s, V, Wb = planted_base(rng, m, n)
    P = np.eye(n) - V[:, :6] @ V[:, :6].T
    dW = rng.standard_normal((m, n)) @ P * 1e-2  # rows orthogonal to W_b's top-6 row space
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    rec = pysafe.compare(bp, tp, dtype="f64", base_rank=6).record("w")
    assert rec["null_frac_right"] == pytest.approx(1.0, abs=1e-9)
    assert rec["null_frac_right"] == pytest.approx(reference(sb, st, base_rank=6)["null_frac_right"], abs=1e-9)


def test_center_matches_reference(tmp_path):
    rng = np.random.default_rng(4)
    m, n = 50, 30
    _, _, _, Wb = planted_base(rng, m, n)
    Wb = Wb + 0.3  # a large mean row, which --center removes
    dW = 0.01 * rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) + 0.02
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    rec = pysafe.compare(bp, tp, dtype="f64", center=True).record("w")
    check_against_reference(rec, reference(sb, st, center=True), rtol=1e-8, atol=1e-9)
    assert pysafe.compare(bp, tp, dtype="f64").record("w")["rank_delta"] != rec["rank_delta"] or \
        pysafe.compare(bp, tp, dtype="f64").record("w")["sv_delta"][0] != pytest.approx(rec["sv_delta"][0])


def test_randomized_matches_exact_on_large_matrix(tmp_path):
    rng = np.random.default_rng(5)
    m, n = 1200, 900
    Wb = rng.standard_normal((m, n)).astype(np.float32) / 30
    sig = np.geomspace(1.0, 0.05, 20)
    dW = (orthonormal(rng, m, 20) * sig) @ orthonormal(rng, n, 20).T + 1e-4 * rng.standard_normal((m, n))
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW)
    rnd = pysafe.compare(bp, tp, rank=10, base_rank=10, exact_max_dim=0, spectrum="none").record("w")
    exact = pysafe.compare(bp, tp, rank=10, base_rank=10, exact=True).record("w")
    assert rnd["svd_method"] == "block_krylov" and exact["svd_method"] == "exact"
    # W_base is Gaussian (a flat spectrum, no gap at k): block Krylov certifies it with the gap-free
    # residual bound (or, when its observed convergence says that would cost more, gram_eig runs);
    # the tolerance is met either way
    assert rnd["svd_method_base"] in ("block_krylov", "gram_eig")
    assert rnd["tol_reached_delta"] and rnd["tol_reached_base"]
    np.testing.assert_allclose(rnd["sv_delta"][:10], exact["sv_delta"][:10], rtol=1e-4)
    ref = np.linalg.svd(st - sb, compute_uv=False)
    np.testing.assert_allclose(rnd["sv_delta"][:10], ref[:10], rtol=1e-4)
    assert 0 <= rnd["svd_rel_error"] <= 1e-4
    assert np.all(np.abs(rnd["sv_delta"][:10] - ref[:10]) <= rnd["svd_rel_error"] * rnd["sv_delta"][:10])
    # deterministic for a seed, different sketch for another seed
    again = pysafe.compare(bp, tp, rank=10, base_rank=10, exact_max_dim=0, spectrum="none").record("w")
    assert again["sv_delta"].tolist() == rnd["sv_delta"].tolist()


def test_energy_rule_with_randomized_svd(tmp_path):
    rng = np.random.default_rng(6)
    m, n = 1100, 1050
    Wb = rng.standard_normal((m, n)).astype(np.float32)
    sig = np.r_[np.linspace(5, 1, 40), np.full(5, 1e-3)]
    dW = (orthonormal(rng, m, 45) * sig) @ orthonormal(rng, n, 45).T
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW)
    rec = pysafe.compare(bp, tp, exact_max_dim=0, base_rank=4).record("w")
    assert rec["svd_method"] == "gram_eig"  # the energy rule needs the whole spectrum
    assert rec["rank_delta"] == energy_rank(sig, 0.9)
    assert rec["energy_reached_delta"] is True
    capped = pysafe.compare(bp, tp, exact_max_dim=0, base_rank=4, max_rank=8).record("w")
    assert capped["rank_delta"] == 8 and capped["energy_reached_delta"] is False


def test_conv1d_transposed_storage(tmp_path):
    """GPT-2 Conv1D weights are stored (in, out): left/right must swap, shape reported as (out, in)."""
    rng = np.random.default_rng(7)
    out_f, in_f = 48, 32
    U, s, V, Wb = planted_base(rng, out_f, in_f)
    dW = U[:, 6:] @ rng.standard_normal((U.shape[1] - 6, in_f)) * 1e-2  # left-null of the logical W
    name = "transformer.h.0.mlp.c_fc.weight"
    save_file({name: Wb.T.copy(), "transformer.h.0.mlp.c_proj.weight": np.eye(4)},
              str(tmp_path / "base.safetensors"))
    save_file({name: (Wb + dW).T.copy(), "transformer.h.0.mlp.c_proj.weight": np.eye(4)},
              str(tmp_path / "tuned.safetensors"))
    cmp = pysafe.compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", dtype="f64", base_rank=6)
    assert cmp.scheme == "gpt2"
    rec = cmp.record(name)
    assert rec["shape"] == [out_f, in_f] and rec["stored_shape"] == [in_f, out_f]
    assert (rec["layer"], rec["module"]) == (0, "up")
    check_against_reference(rec, reference(Wb, Wb + dW, base_rank=6), rtol=1e-8, atol=1e-9)
    assert rec["null_frac_left"] == pytest.approx(1.0, abs=1e-9)


def test_lora_adapter_factored_equals_dense(tmp_path):
    """A PEFT adapter (ΔW = alpha/r · B·A) gives the same metrics as the merged dense checkpoint."""
    import json

    rng = np.random.default_rng(8)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    shapes = [(32, 32), (32, 80)]
    base, merged, adapter = {}, {}, {}
    r, alpha = 4, 8.0
    for nm, (o, i) in zip(names, shapes):
        _, _, _, Wb = planted_base(rng, o, i)
        A = rng.standard_normal((r, i)) * 0.1
        B = rng.standard_normal((o, r)) * 0.1
        base[nm] = Wb
        merged[nm] = Wb + (alpha / r) * B @ A
        mod = nm[: -len(".weight")]
        adapter[f"base_model.model.{mod}.lora_A.weight"] = A
        adapter[f"base_model.model.{mod}.lora_B.weight"] = B
    (tmp_path / "base").mkdir()
    (tmp_path / "merged").mkdir()
    (tmp_path / "adapter").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    save_file(merged, str(tmp_path / "merged" / "model.safetensors"))
    save_file(adapter, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"]}))
    dense = pysafe.compare(tmp_path / "base", tmp_path / "merged", dtype="f64")
    fact = pysafe.compare(tmp_path / "base", tmp_path / "adapter", dtype="f64")
    assert fact.tuned["format"] == "peft"
    for nm in names:
        d, f = dense.record(nm), fact.record(nm)
        assert f["svd_method"] == "factored" and f["lora_rank"] == r
        for key in SCALARS:
            assert f[key] == pytest.approx(d[key], rel=1e-7, abs=1e-9), (nm, key)
        np.testing.assert_allclose(f["sv_delta"][:r], d["sv_delta"][:r], rtol=1e-9)
        assert f["rank_delta"] == d["rank_delta"]


def test_vectors_saved_are_orthonormal_and_match(tmp_path):
    rng = np.random.default_rng(9)
    m, n = 40, 30
    _, _, _, Wb = planted_base(rng, m, n)
    dW = 0.05 * rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
    bp, tp, sb, st = write_pair(tmp_path, Wb, Wb + dW, dtype=np.float64)
    rec = pysafe.compare(bp, tp, save_vectors=True, rank=3).record("w")
    U, V = rec["vectors"]["U_delta"], rec["vectors"]["V_delta"]
    assert U.shape == (m, 3) and V.shape == (n, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-5)
    recon = (U * rec["sv_delta"][:3]) @ V.T
    np.testing.assert_allclose(recon, st - sb, atol=1e-5)
    # the base projector is idempotent
    Ub = rec["vectors"]["U_base"].astype(np.float64)
    P = Ub @ Ub.T
    np.testing.assert_allclose(P @ P, P, atol=1e-5)


def test_zero_delta_and_norm_only_tensors(tmp_path):
    rng = np.random.default_rng(10)
    W = rng.standard_normal((20, 10))
    v = rng.standard_normal(10)
    save_file({"w": W, "b": v}, str(tmp_path / "base.safetensors"))
    save_file({"w": W, "b": v + 0.5}, str(tmp_path / "tuned.safetensors"))
    cmp = pysafe.compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    w, b = cmp.record("w"), cmp.record("b")
    assert w["delta_fro"] == 0 and w["rank_delta"] == 0 and np.isnan(w["null_frac_left"])
    assert b["delta_fro"] == pytest.approx(0.5 * np.sqrt(10))
    assert b["delta_rel"] == pytest.approx(0.5 * np.sqrt(10) / np.linalg.norm(v))
    assert "sv_delta" not in b


def test_truncated_svd_api_against_numpy():
    rng = np.random.default_rng(11)
    A = rng.standard_normal((300, 200))
    U, S, Vt, info = pysafe.truncated_svd(A, rank=5)
    ref = np.linalg.svd(A, compute_uv=False)
    np.testing.assert_allclose(S[:5], ref[:5], rtol=1e-12)
    np.testing.assert_allclose(U[:, :5].T @ U[:, :5], np.eye(5), atol=1e-12)
    with pytest.raises(TypeError):
        pysafe.truncated_svd(A.astype(np.int32))
    with pytest.raises(ValueError):
        pysafe.truncated_svd(A[0])

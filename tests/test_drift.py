"""``pysafe.drift`` / ``pysafe drift``: every record key against an independent float64 NumPy computation,
planted scenarios (undo, inside / orthogonal / random ΔT), chance levels against seeded Monte Carlo, the
bootstrap against scipy, a LoRA adapter against its merged checkpoint, intruders against PEFT's own helper,
and the command end to end (files, page, bad input)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import pysafe
from pysafe.cli import main
from pysafe.drift import _COLUMNS, _stats, bootstrap_ci
from pysafe.linalg import sin_theta_chance

LLAMA = [f"model.layers.{layer}.{mod}.weight" for layer in range(3)
         for mod in ("self_attn.q_proj", "mlp.down_proj")]
SHAPES = {"q_proj": (40, 40), "down_proj": (40, 56)}


def _shape(name):
    return SHAPES[name.split(".")[-2]]


def _write(root, tensors: dict, name="model.safetensors"):
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(root / name))
    return root


def _orth(rng, m, k):
    return np.linalg.qr(rng.standard_normal((m, k)))[0]


def _planted(rng, m, n, rank=3, scale=1.0):
    """ΔA of known rank with well separated singular values."""
    return _orth(rng, m, rank) @ np.diag(scale * np.array([3.0, 2.0, 1.5][:rank])) @ _orth(rng, n, rank).T


def _triple(tmp_path, make_dT, seed=0, names=LLAMA, transposed=False):
    """BASE/ALIGNED/TUNED safetensors dirs; ``make_dT(rng, dA)`` gives ΔT in (out, in) orientation."""
    rng = np.random.default_rng(seed)
    B, A, T, ref = {}, {}, {}, {}
    for nm in names:
        m, n = _shape(nm) if not transposed else (48, 32)
        Wb = rng.standard_normal((m, n)) / math.sqrt(n)
        dA = _planted(rng, m, n)
        dT = make_dT(rng, dA)
        ref[nm] = (Wb, dA, dT)
        f = (lambda x: x.T) if transposed else (lambda x: x)
        B[nm], A[nm], T[nm] = f(Wb), f(Wb + dA), f(Wb + dA + dT)
    return (_write(tmp_path / "base", B), _write(tmp_path / "aligned", A), _write(tmp_path / "tuned", T), ref)


def _residual_sines(U_sub, U):
    """Distance of each column of U to span(U_sub), by least squares (independent of the engine's sin θ)."""
    coef, *_ = np.linalg.lstsq(U_sub, U, rcond=None)
    return np.linalg.norm(U - U_sub @ coef, axis=0)


def _energy_k(s, energy):
    c = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.searchsorted(c, energy - 1e-12) + 1)


def _reference(Wb, dA, dT, energy=0.9, k=None, ik=10, eps=0.5):
    """Every record key from a float64 full SVD (numpy), written from the definitions."""
    m, n = dA.shape
    U, s, Vt = np.linalg.svd(dA)
    kA = k or _energy_k(s, energy)
    UA, VA = U[:, :kA], Vt[:kA].T
    tt, aa = np.sum(dT ** 2), np.sum(dA ** 2)
    PU, PV = UA @ UA.T, VA @ VA.T
    dAk = UA @ np.diag(s[:kA]) @ VA.T
    out = {"k_A": kA, "norm_delta_A": np.linalg.norm(dA), "norm_delta_T": np.linalg.norm(dT),
           "norm_aligned": np.linalg.norm(Wb + dA), "rel_delta_T": np.linalg.norm(dT) / np.linalg.norm(Wb + dA),
           "energy_left": np.sum((PU @ dT) ** 2) / tt, "energy_right": np.sum((dT @ PV) ** 2) / tt,
           "energy_both": np.sum((PU @ dT @ PV) ** 2) / tt,
           "energy_left_chance": kA / m, "energy_right_chance": kA / n, "energy_both_chance": kA ** 2 / (m * n),
           "inner_TA": np.sum(dT * dA), "undo": -np.sum(dT * dA) / aa,
           "cos_TA": np.sum(dT * dA) / math.sqrt(tt * aa), "cos_TA_chance_sd": 1 / math.sqrt(m * n),
           "undo_topk": -np.sum(dT * dAk) / np.sum(dAk ** 2),
           "cos_TA_topk": np.sum(dT * dAk) / math.sqrt(tt * np.sum(dAk ** 2))}
    for side in ("left", "right", "both"):
        out[f"energy_{side}_ratio"] = out[f"energy_{side}"] / out[f"energy_{side}_chance"]
    UT_, sT, VTt = np.linalg.svd(dT)
    kT = k or _energy_k(sT, energy)
    out["k_T"] = kT
    out["sin_theta_left"] = np.mean(_residual_sines(UA, UT_[:, :kT]))
    out["sin_theta_right"] = np.mean(_residual_sines(VA, VTt[:kT].T))
    U_al = np.linalg.svd(Wb + dA, full_matrices=False)[0]
    U_tu = np.linalg.svd(Wb + dA + dT, full_matrices=False)[0]
    U_b = np.linalg.svd(Wb, full_matrices=False)[0]
    cos = np.abs(U_tu[:, :ik].T @ U_al).max(axis=1)
    out["intruder_max_cos"] = cos
    out["intruder_indices"] = [int(i) for i in np.flatnonzero(cos < eps)]
    out["intruder_count"] = len(out["intruder_indices"])
    out["intruder_count_alignment"] = int(np.sum(np.abs(U_al[:, :ik].T @ U_b).max(axis=1) < eps))
    return out


def _check_record(rec, ref, rel=1e-7):
    for key, want in ref.items():
        got = rec[key]
        if isinstance(want, (list, int)) and not isinstance(want, bool):
            assert got == want, key
        elif isinstance(want, np.ndarray):
            np.testing.assert_allclose(got, want, rtol=rel, atol=1e-9, err_msg=key)
        else:
            assert got == pytest.approx(float(want), rel=rel, abs=1e-10), key


def _generic_dT(rng, dA):
    """A ΔT with a part along ΔA, a low-rank part of its own (a planted intruder) and noise."""
    m, n = dA.shape
    x, y = _orth(rng, m, 1), _orth(rng, n, 1)
    return -0.3 * dA + 4.0 * x @ y.T + 0.02 * rng.standard_normal((m, n))


@pytest.mark.parametrize("transposed", [False, True])
def test_every_record_key_against_numpy_float64(tmp_path, transposed):
    names = LLAMA if not transposed else [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(3)]
    bp, ap, tp, ref = _triple(tmp_path, _generic_dT, seed=1, names=names, transposed=transposed)
    res = pysafe.drift(bp, ap, tp, exact=True)
    fast = pysafe.drift(bp, ap, tp)  # the engine's cheapest SVDs within tol = 1e-4
    assert len(res.records) == len(names) and not res.skipped
    for nm in names:
        rec = res.record(nm)
        assert rec["transposed"] is transposed and rec["tuned_kind"] == "dense"
        want = _reference(*ref[nm])
        _check_record(rec, want)
        _check_record(fast.record(nm), want, rel=1e-3)
        assert rec["intruder_count"] >= 1  # the planted rank-one direction is an intruder
        assert rec["sin_theta_left_chance"] == pytest.approx(sin_theta_chance(rec["shape"][0], rec["k_A"]))
    # a fixed k instead of the energy rule
    res3 = pysafe.drift(bp, ap, tp, k=2, intruder_k=4, intruder_eps=0.3, exact=True)
    for nm in names:
        _check_record(res3.record(nm), _reference(*ref[nm], k=2, ik=4, eps=0.3))


def _cases(tmp_path, kind, seed=3, n_matrices=8):
    def make(rng, dA):
        m, n = dA.shape
        U, s, Vt = np.linalg.svd(dA)
        UA, VA = U[:, :3], Vt[:3].T
        if kind == "undo":
            return -0.4 * dA + 0.002 * rng.standard_normal((m, n))
        if kind == "inside":
            return UA @ rng.standard_normal((3, 3)) @ VA.T
        if kind == "orthogonal":
            G = rng.standard_normal((m, n))
            return (G - UA @ (UA.T @ G)) - (G - UA @ (UA.T @ G)) @ VA @ VA.T
        return rng.standard_normal((m, n))  # random

    names = [f"model.layers.{layer}.self_attn.q_proj.weight" for layer in range(n_matrices)]
    return pysafe.drift(*_triple(tmp_path / kind, make, seed=seed, names=names)[:3], k=3)


def test_planted_undo_is_recovered(tmp_path):
    res = _cases(tmp_path, "undo")
    for r in res.records:
        assert r["undo"] == pytest.approx(0.4, abs=2e-3) and r["cos_TA"] < -0.99
    g = res.summary["model"]
    assert g["undo"] == pytest.approx(0.4, abs=2e-3)
    lo, hi = g["undo_ci95"]
    assert lo <= g["undo"] <= hi and hi - lo < 0.01
    assert "It undoes 40.0%" in res.summary["verdict"]


def test_inside_vs_orthogonal_vs_random(tmp_path):
    inside, orth = (_cases(tmp_path, k) for k in ("inside", "orthogonal"))
    rand = _cases(tmp_path, "random", n_matrices=24)
    assert all(r["energy_both"] == pytest.approx(1.0, abs=1e-9) for r in inside.records)
    assert all(r["sin_theta_left"] < 1e-6 for r in inside.records)
    assert all(r["energy_both"] < 1e-12 and r["energy_left"] < 1e-12 for r in orth.records)
    assert all(abs(r["undo"]) < 1e-12 for r in orth.records)
    assert "no evidence of overlap" not in inside.summary["verdict"]
    # random ΔT: every aggregate at chance (within 4 bootstrap standard errors; a chance level off by a few
    # percent fails), and the verdict finds no overlap
    g = rand.summary["model"]
    for key in ("energy_left", "energy_right", "energy_both", "sin_theta_left", "sin_theta_right"):
        lo, hi = g[key + "_ratio_ci95"]
        assert abs(g[key + "_ratio"] - 1) < 4 * (hi - lo) / (2 * 1.96), key
        assert hi - lo < 0.5, key
    assert abs(g["undo"]) < 4 * g["undo_chance_sd"]
    v = rand.summary["verdict"]
    assert "No evidence of overlap" in v and "No evidence that it undoes" in v


def test_chance_levels_against_monte_carlo(tmp_path):
    """Each *_chance of a record is the mean of its statistic over random subspaces / directions."""
    bp, ap, tp, ref = _triple(tmp_path, _generic_dT, seed=5, names=LLAMA[1:2])
    rec = pysafe.drift(bp, ap, tp, k=4).records[0]
    _, _, dT = ref[LLAMA[1]]
    m, n = rec["shape"]
    k = rec["k_A"]
    rng = np.random.default_rng(123)
    tt = np.sum(dT ** 2)
    el, er, eb, sines, cos = [], [], [], [], []
    for _ in range(3000):
        U, V = _orth(rng, m, k), _orth(rng, n, k)
        el.append(np.sum((U.T @ dT) ** 2) / tt)
        er.append(np.sum((dT @ V) ** 2) / tt)
        eb.append(np.sum((U.T @ dT @ V) ** 2) / tt)
        sines.append(np.mean(_residual_sines(U, _orth(rng, m, rec["k_T"]))))  # random ΔT subspace vs fixed one
        D = rng.standard_normal((m, n))
        cos.append(np.sum(D * dT) / (np.linalg.norm(D) * math.sqrt(tt)))
    se = lambda x: np.std(x) / math.sqrt(len(x))  # noqa: E731
    for key, xs in (("energy_left", el), ("energy_right", er), ("energy_both", eb), ("sin_theta_left", sines)):
        assert abs(np.mean(xs) - rec[key + "_chance"]) < 5 * se(xs), key
    # sin θ's chance is E[sin θ]: the expectation of sin² θ (1 − k/m) would be rejected
    assert abs(np.mean(sines) - (1 - k / m)) > 5 * se(sines)
    assert abs(np.mean(cos)) < 5 * se(cos)
    assert np.std(cos) == pytest.approx(rec["cos_TA_chance_sd"], rel=0.05)
    assert rec["undo_chance_sd"] == pytest.approx(rec["cos_TA_chance_sd"] * rec["norm_delta_T"] / rec["norm_delta_A"])


def test_whole_model_undo_control_against_monte_carlo(tmp_path):
    """summary.model.undo_chance_sd is the sd of the aggregate undo when each ΔT is a random direction of its
    own size."""
    bp, ap, tp, ref = _triple(tmp_path, _generic_dT, seed=8)
    res = pysafe.drift(bp, ap, tp, intruder_k=0)
    rng = np.random.default_rng(9)
    draws = []
    for _ in range(4000):
        num = den = 0.0
        for nm, (_, dA, dT) in ref.items():
            D = rng.standard_normal(dA.shape)
            D *= np.linalg.norm(dT) / np.linalg.norm(D)
            num -= np.sum(D * dA)
            den += np.sum(dA ** 2)
        draws.append(num / den)
    g = res.summary["model"]
    assert abs(np.mean(draws)) < 5 * np.std(draws) / math.sqrt(len(draws))
    assert np.std(draws) == pytest.approx(g["undo_chance_sd"], rel=0.05)


def test_bootstrap_interval_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    N = 40
    X = np.zeros((N, len(_COLUMNS)))
    col = {c: i for i, c in enumerate(_COLUMNS)}
    X[:, col["tt"]] = rng.uniform(0.5, 2.0, N)
    X[:, col["e_both"]] = X[:, col["tt"]] * rng.uniform(0.0, 0.4, N)
    X[:, col["aa"]] = rng.uniform(0.5, 2.0, N)
    X[:, col["neg_inner"]] = rng.normal(0.1, 0.3, N)
    ours = bootstrap_ci(X, n_boot=20000)
    for key, num, den in (("energy_both", "e_both", "tt"), ("undo", "neg_inner", "aa")):
        point = _stats(X.sum(axis=0))[key]
        ref = scipy_stats.bootstrap((X[:, col[num]], X[:, col[den]]), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis),
                                    paired=True, vectorized=True, n_resamples=20000, method="percentile",
                                    random_state=np.random.default_rng(1)).confidence_interval
        width = ref.high - ref.low
        assert ref.low < point < ref.high
        assert ours[key][0] == pytest.approx(ref.low, abs=0.05 * width), key
        assert ours[key][1] == pytest.approx(ref.high, abs=0.05 * width), key


def _adapter(tmp_path, seed=11, r=4, alpha=8.0, rslora=False):
    """BASE, ALIGNED, a LoRA adapter on ALIGNED and the merged TUNED checkpoint it equals."""
    rng = np.random.default_rng(seed)
    B, Al, merged, adapter = {}, {}, {}, {}
    scale = alpha / (math.sqrt(r) if rslora else r)
    for nm in LLAMA:
        m, n = _shape(nm)
        Wb = rng.standard_normal((m, n)) / math.sqrt(n)
        dA = _planted(rng, m, n)
        # scale·B·A = −0.3·ΔA (a part along ΔA, through its rank-3 factors) + a random rank-(r − 3) part
        U, sv, Vt = np.linalg.svd(dA)
        A = np.vstack([Vt[:3], rng.standard_normal((r - 3, n)) * 0.1])
        Bf = np.hstack([-0.3 / scale * U[:, :3] * sv[:3], rng.standard_normal((m, r - 3)) * 0.1])
        B[nm], Al[nm], merged[nm] = Wb, Wb + dA, Wb + dA + scale * Bf @ A
        mod = nm[: -len(".weight")]
        adapter[f"base_model.model.{mod}.lora_A.weight"] = A
        adapter[f"base_model.model.{mod}.lora_B.weight"] = Bf
    ad = _write(tmp_path / "adapter", adapter, "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                        "use_rslora": rslora,
                                                        "target_modules": ["q_proj", "down_proj"]}))
    return (_write(tmp_path / "base", B), _write(tmp_path / "aligned", Al), ad, _write(tmp_path / "merged", merged))


def test_lora_adapter_equals_its_merged_checkpoint(tmp_path):
    bp, ap, adp, mp = _adapter(tmp_path)
    fact, dense = pysafe.drift(bp, ap, adp, exact=True), pysafe.drift(bp, ap, mp, exact=True)
    assert fact.tuned["format"] == "peft"
    for nm in LLAMA:
        f, d = fact.record(nm), dense.record(nm)
        assert f["tuned_kind"] == "lora" and f["lora_rank"] == 4 and d["tuned_kind"] == "dense"
        assert f["undo"] == pytest.approx(0.3, abs=0.05)  # the planted part along ΔA is seen
        for key, v in d.items():
            if key in ("tuned_kind",):
                continue
            if isinstance(v, float):
                assert f[key] == pytest.approx(v, rel=1e-7, abs=1e-9), (nm, key)
            elif key == "intruder_max_cos":
                np.testing.assert_allclose(f[key], v, rtol=1e-7)
            else:
                assert f[key] == v, (nm, key)
    assert fact.summary["verdict"] == dense.summary["verdict"]


def test_intruders_match_peft(tmp_path):
    """Intruder counts equal PEFT's own detection (peft.tuners.lora.intruders) on the same weights."""
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import peft
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    bp, ap, adp, _ = _adapter(tmp_path, seed=12, r=4, alpha=64.0)
    res = pysafe.drift(bp, ap, adp)
    from safetensors.numpy import load_file

    aligned = load_file(str(ap / "model.safetensors"))
    ad = load_file(str(adp / "adapter_model.safetensors"))
    for nm in LLAMA:
        m, n = _shape(nm)

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(n, m, bias=False, dtype=torch.float64)

        model = One()
        model.proj.weight.data = torch.from_numpy(aligned[nm])
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=64.0, target_modules=["proj"]))
        pm.double()
        mod = nm[: -len(".weight")]
        layer = pm.base_model.model.proj
        layer.lora_A["default"].weight.data = torch.from_numpy(ad[f"base_model.model.{mod}.lora_A.weight"])
        layer.lora_B["default"].weight.data = torch.from_numpy(ad[f"base_model.model.{mod}.lora_B.weight"])
        lines = []
        reduce_intruder_dimension(pm, top_k=10, threshold_epsilon=0.5, logging_sink=lines.append)
        found = [ln for ln in lines if ln.startswith("base_model.model.proj:")]
        assert len(found) == 1, lines
        m_ = re.search(r"Intruders: (\d+)", found[0])
        assert (int(m_.group(1)) if m_ else 0) == res.record(nm)["intruder_count"], (nm, found)
    assert sum(r["intruder_count"] for r in res.records) > 0  # the test saw intruders, not only zeros


def _cli(*args):
    return CliRunner().invoke(main, ["drift", *map(str, args)])


def test_cli_end_to_end_and_report_page(tmp_path):
    bp, ap, tp, _ = _triple(tmp_path, _generic_dT, seed=2)
    out = tmp_path / "out"
    r = _cli(bp, ap, tp, "--out", out, "--include", r"layers\.[01]\.")
    assert r.exit_code == 0, r.output
    assert "pre-flight: 4 matrices" in r.stderr and "4 matrices analysed" in r.stdout
    data = json.loads((out / "drift.json").read_text())
    assert data["schema_version"] == 1 and len(data["matrices"]) == 4
    assert data["params"]["include"] == r"layers\.[01]\." and data["summary"]["verdict"] in r.stdout
    api = pysafe.drift(bp, ap, tp, include=r"layers\.[01]\.")
    for rec in data["matrices"]:
        assert rec["undo"] == pytest.approx(api.record(rec["name"])["undo"], rel=1e-12)
    rows = (out / "drift.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("name,")
    assert {p.name for p in (out / "plots").iterdir()} == {"drift_energy.png", "drift_undo.png"}
    page = (out / "index.html").read_text()
    assert "Drift: does the fine-tune undo the alignment?" in page and "Per layer (0-based)" in page
    assert "plots/drift_undo.png" in page
    (out / "index.html").unlink()
    rep = CliRunner().invoke(main, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    assert "Drift: does the fine-tune undo the alignment?" in (out / "index.html").read_text()
    # an existing --out is refused without --overwrite
    again = _cli(bp, ap, tp, "--out", out)
    assert again.exit_code != 0 and "overwrite" in again.stderr


def _one_line_error(r):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("pre-flight")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_cli_bad_inputs(tmp_path):
    bp, ap, tp, _ = _triple(tmp_path, _generic_dT, seed=4)
    name = LLAMA[0]
    # a shape mismatch in TUNED
    bad = {k: v for k, v in _load(tp).items()}
    bad[name] = np.zeros((8, 8))
    wrong = _write(tmp_path / "wrong", bad)
    err = _one_line_error(_cli(bp, ap, wrong, "--out", tmp_path / "o1"))
    assert name in err and "[8, 8]" in err
    assert not (tmp_path / "o1").exists()
    # a matrix missing from ALIGNED
    missing = {k: v for k, v in _load(ap).items() if k != name}
    mp = _write(tmp_path / "missing", missing)
    err = _one_line_error(_cli(bp, mp, tp, "--out", tmp_path / "o2"))
    assert name in err and str(mp) in err
    assert not (tmp_path / "o2").exists()
    # an adapter as BASE
    adp = _adapter(tmp_path / "ad")[2]
    err = _one_line_error(_cli(adp, ap, tp, "--out", tmp_path / "o3"))
    assert "BASE is a PEFT adapter" in err
    # nothing matches --include; a bad regular expression
    err = _one_line_error(_cli(bp, ap, tp, "--out", tmp_path / "o4", "--include", "nomatch"))
    assert "nomatch" in err
    assert not (tmp_path / "o4").exists()
    with pytest.raises(ValueError, match="include"):
        pysafe.drift(bp, ap, tp, include="(")
    # the inputs were not touched
    assert _load(tp).keys() == set(LLAMA)


def _load(p):
    from safetensors.numpy import load_file

    return load_file(str(p / "model.safetensors"))


def test_api_result_helpers(tmp_path):
    bp, ap, tp, _ = _triple(tmp_path, _generic_dT, seed=6)
    res = pysafe.drift(bp, ap, tp, intruder_k=0)
    assert "intruder_count" not in res.records[0] and "Intruder" not in res.summary["verdict"]
    with pytest.raises(KeyError, match="did you mean"):
        res.record(LLAMA[0].replace("q_proj", "q_prj"))
    assert set(res.summary["by_layer"]) == {"0", "1", "2"} and set(res.summary["by_module"]) == {"q", "down"}


def test_to_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    bp, ap, tp, _ = _triple(tmp_path, _generic_dT, seed=6, names=LLAMA[:2])
    df = pysafe.drift(bp, ap, tp).to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 2 and "undo" in df.columns


def test_alignment_memo_reuses_the_alignment_side_with_identical_records(tmp_path, monkeypatch):
    """Two TUNED checkpoints against one BASE and ALIGNED through one AlignmentMemo: every record equals the
    memo-less call's, the second call skips ΔA's SVD and the intruder control's two full SVDs (counted at
    the engine's truncated_svd), a memo too small for W_aligned's vectors recomputes them and still agrees,
    and a memo filled for another pair or other options refuses to serve."""
    import importlib

    from pysafe.drift import AlignmentMemo

    drift_mod = importlib.import_module("pysafe.drift")  # the module (pysafe.drift is also the function)

    bp, ap, tp, _ = _triple(tmp_path / "one", _generic_dT, seed=7)
    rng = np.random.default_rng(8)
    from safetensors.numpy import load_file

    T2 = {nm: W + 0.05 * rng.standard_normal(W.shape) for nm, W in load_file(str(ap / "model.safetensors")).items()}
    tp2 = _write(tmp_path / "tuned2", T2)
    calls = []
    real = drift_mod.truncated_svd
    monkeypatch.setattr(drift_mod, "truncated_svd", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    plain = [pysafe.drift(bp, ap, t) for t in (tp, tp2)]
    n_plain = len(calls)
    for max_bytes in (1 << 30, 0):
        memo = AlignmentMemo(max_bytes=max_bytes)
        del calls[:]
        first = drift_mod.drift(bp, ap, tp, memo=memo)
        n_first = len(calls)
        second = drift_mod.drift(bp, ap, tp2, memo=memo)
        n_second = len(calls) - n_first
        assert n_first == n_plain // 2
        # per matrix, without the memo: ΔA, ΔT, W_aligned (all), W_tuned (top), W_base (all) = 5 SVDs
        saved = 3 if max_bytes else 2
        assert n_second == n_first - saved * len(LLAMA), (max_bytes, n_first, n_second)
        assert memo.hits == len(LLAMA)
        for want, got in zip(plain, (first, second)):
            assert [r["name"] for r in got.records] == [r["name"] for r in want.records]
            for r_w, r_g in zip(want.records, got.records):
                assert r_g == r_w
            assert got.summary == want.summary
    with pytest.raises(ValueError, match="another BASE, ALIGNED or other drift options"):
        drift_mod.drift(bp, ap, tp, k=2, memo=memo)
    other = _triple(tmp_path / "two", _generic_dT, seed=9)
    with pytest.raises(ValueError, match="another BASE"):
        drift_mod.drift(other[0], other[1], other[2], memo=memo)

"""The randomized SVD's kernels against NumPy: CholeskyQR2 and its Householder fallback, the
incremental sketch of the energy rule, and the two-lane (ΔW ‖ W_base) analysis."""

from __future__ import annotations

import numpy as np
import pytest

import pysafe
from pysafe import _core


def _with_condition(rng, m, n, cond, rank=None):
    """An m×n matrix with singular values geometrically from 1 to 1/cond (zero past `rank`)."""
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.geomspace(1.0, 1.0 / cond, n)
    if rank is not None:
        s[rank:] = 0.0
    return (U * s) @ V.T


def _check_basis(A, Q, orth_tol, span_tol):
    """Q has orthonormal columns and spans what NumPy's QR of A spans."""
    Qd = Q.astype(np.float64)
    n = A.shape[1]
    assert np.abs(Qd.T @ Qd - np.eye(n)).max() < orth_tol
    Qref, _ = np.linalg.qr(A.astype(np.float64))
    # same column space: the projectors agree (on the directions A has; A full rank here)
    assert np.linalg.norm(Qd @ (Qd.T @ Qref) - Qref) / np.sqrt(n) < span_tol


@pytest.mark.parametrize("dtype, orth_tol", [(np.float32, 5e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("m, n", [(512, 74), (2048, 74), (300, 300)])
def test_cholqr2_is_orthonormal_and_spans_the_columns(m, n, dtype, orth_tol):
    rng = np.random.default_rng(m + n)
    A = _with_condition(rng, m, n, 100.0).astype(dtype)
    Q, path = _core.orthonormalize(A)
    assert path == "cholqr2"
    assert Q.dtype == dtype and Q.shape == (m, n)
    _check_basis(A, Q, orth_tol, span_tol=1e-4 if dtype == np.float32 else 1e-10)


def test_cholqr_in_double_handles_what_float_cannot():
    A = _with_condition(np.random.default_rng(1), 1000, 60, 1e6)
    Q, path = _core.orthonormalize(A)
    assert path == "cholqr2"  # κ² = 1e12 < 1/u in f64
    _check_basis(A, Q, 1e-13, 1e-9)


def test_ill_conditioned_float_falls_back_to_householder():
    # κ = 1e6: the Gram matrix's κ² = 1e12 is far past f32's 1/u, the Cholesky fails or the
    # passes do not converge; the basis must still be orthonormal and span A's columns.
    A = _with_condition(np.random.default_rng(2), 2000, 74, 1e6).astype(np.float32)
    Q, path = _core.orthonormalize(A)
    assert path == "householder"
    Qd = Q.astype(np.float64)
    assert np.abs(Qd.T @ Qd - np.eye(74)).max() < 5e-6
    # A is reproduced by its projection on Q to f32 accuracy
    assert np.linalg.norm(A - Qd @ (Qd.T @ A)) / np.linalg.norm(A) < 1e-5


def test_rank_deficient_input_falls_back_and_stays_orthonormal():
    A = _with_condition(np.random.default_rng(3), 800, 50, 10.0, rank=12).astype(np.float32)
    Q, path = _core.orthonormalize(A)
    assert path == "householder"
    Qd = Q.astype(np.float64)
    assert np.abs(Qd.T @ Qd - np.eye(50)).max() < 5e-6
    assert np.linalg.norm(A - Qd @ (Qd.T @ A)) / np.linalg.norm(A) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_householder_path_matches_numpy_qr(dtype):
    A = _with_condition(np.random.default_rng(4), 700, 40, 1e3).astype(dtype)
    Q, path = _core.orthonormalize(A, householder=True)
    assert path == "householder"
    _check_basis(A, Q, 5e-6 if dtype == np.float32 else 1e-13, 1e-4 if dtype == np.float32 else 1e-10)


def test_orthonormalize_leaves_its_input_alone_and_checks_shape():
    A = np.random.default_rng(5).standard_normal((100, 10)).astype(np.float32)
    before = A.copy()
    _core.orthonormalize(A)
    np.testing.assert_array_equal(A, before)
    with pytest.raises(ValueError):
        _core.orthonormalize(A.T.copy())
    with pytest.raises(TypeError):
        _core.orthonormalize(A.astype(np.int32))


def test_energy_rule_reaches_its_energy_and_matches_numpy():
    # 70 significant directions with a flat spectrum: k is defined by the whole spectrum, which
    # gram_eig computes (no cap: the energy is reached).
    rng = np.random.default_rng(6)
    m, n, r = 1500, 1200, 70
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))
    sig = np.linspace(2.0, 1.0, r)
    A = ((U * sig) @ V.T + 1e-4 * rng.standard_normal((m, n))).astype(np.float32)
    _, S, _, info = pysafe.truncated_svd(A, energy=0.9, exact_max_dim=0)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    assert info["method"] == "gram_eig" and info["energy_reached"] and info["full_spectrum"]
    k = info["k"]
    expect = int(np.searchsorted(np.cumsum(ref**2) / np.sum(ref**2), 0.9 * (1 - 1e-6)) + 1)
    assert k == expect
    np.testing.assert_allclose(S[:k], ref[:k], rtol=1e-4)
    assert info["rel_error"] < 1e-4 and info["tol_reached"]
    np.testing.assert_allclose(info["spectrum"], ref, rtol=1e-4, atol=1e-6 * ref[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_two_lane_analysis_matches_sequential(tmp_path, threads):
    """ΔW's and W_base's SVDs (and the left/right metrics) run side by side at >= 2 threads: same
    results as one after the other, and bit-identical reruns."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    save_file({"w": rng.standard_normal((600, 520)).astype(np.float32)}, str(tmp_path / "b.safetensors"))
    save_file({"w": rng.standard_normal((600, 520)).astype(np.float32)}, str(tmp_path / "t.safetensors"))
    run = lambda t: pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=16,  # noqa: E731
                                   base_rank=16, threads=t, exact_max_dim=0).record("w")
    one, many, again = run(1), run(threads), run(threads)
    assert many["sv_delta"].tolist() == again["sv_delta"].tolist()
    for key in ("sv_delta", "sv_base", "sin_theta_left", "sin_theta_right"):
        np.testing.assert_allclose(many[key], one[key], rtol=1e-4, atol=1e-5)
    for key in ("null_frac_left", "null_frac_right", "overlap_left", "overlap_right", "svd_rel_error"):
        assert many[key] == pytest.approx(one[key], rel=1e-3, abs=1e-6)

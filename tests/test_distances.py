"""The native distance engine against NumPy float64 (issue 4, point 2)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import pysafe
from pysafe import _core
from pysafe.distances import distance_summary, pairwise_distances, write_distance_matrix


def _ref(a, b, metric):
    """float64 difference-first reference."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if metric == "cosine":
        na = np.linalg.norm(a, axis=1, keepdims=True)
        nb = np.linalg.norm(b, axis=1, keepdims=True)
        an = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
        bn = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
        d = 0.5 * ((an[:, None, :] - bn[None, :, :]) ** 2).sum(-1)
        zero = (na[:, 0] == 0)[:, None] | (nb[:, 0] == 0)[None, :]
        return np.where(zero, 1.0, d)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    scale = np.maximum(np.abs(want), 1e-30)
    err = np.abs(got - want) / scale
    return float(np.where(want == 0, np.abs(got), err).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_random_against_float64(dtype, metric):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((700, 96)).astype(dtype)  # more than one 512-block in each direction
    b = rng.standard_normal((530, 96)).astype(dtype)
    got = pairwise_distances(a, b, metric)
    assert got.dtype == dtype and got.shape == (700, 530)
    assert _rel_err(got, _ref(a, b, metric)) <= (1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_self_distances_symmetric_zero_diagonal(metric):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1100, 40)).astype(np.float32)
    D = pairwise_distances(a, metric=metric)
    assert np.array_equal(D, D.T) and np.all(np.diag(D) == 0)
    off = ~np.eye(1100, dtype=bool)
    assert _rel_err(D[off], _ref(a, a, metric)[off]) <= 1e-5


def test_near_duplicates_and_large_offset():
    """Cancellation cases: points 1e-4 apart on a common offset of 1e4 (the Gram identity in f32 would
    return garbage there); pairs are recomputed difference-first."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 64)) + 1e4
    a = np.concatenate([base, base + 1e-3 * rng.standard_normal((300, 64))]).astype(np.float32)
    got, stats = _core.pairwise_distances(a, a.copy(), "euclidean")
    want = _ref(a, a, "euclidean")
    assert stats["recomputed"] > 0
    assert _rel_err(got, want) <= 1e-5
    # exact duplicates: exactly 0 even off the diagonal of a cross-distance call
    assert np.all(got[np.arange(600), np.arange(600)] == 0)
    D = pairwise_distances(a)
    assert np.all(np.diag(D) == 0) and _rel_err(D[~np.eye(600, dtype=bool)], want[~np.eye(600, dtype=bool)]) <= 1e-5


def test_large_norms_cosine_and_zero_rows():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 30)) * 1e15
    a[7] = 0.0
    b = a[:20] * 3.0 + 1e-3 * rng.standard_normal((20, 30)) * 1e15  # nearly parallel to a[:20]
    got = pairwise_distances(a.astype(np.float32), b.astype(np.float32), "cosine")
    want = _ref(a.astype(np.float32), b.astype(np.float32), "cosine")
    assert np.all(got[7] == 1.0)
    keep = want > 1e-6  # tiny cosine distances: absolute error is what float32 can promise
    assert _rel_err(got[keep], want[keep]) <= 1e-5 and np.abs(got - want).max() <= 1e-6
    D = pairwise_distances(a, metric="cosine")
    assert D[7, 7] == 0.0 and np.all(np.delete(D[7], 7) == 1.0)


def test_rows_stripes_are_bit_identical_and_h5(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((1200, 33)).astype(np.float32)
    D = pairwise_distances(a)
    for r0, r1 in ((0, 1), (5, 517), (511, 1200), (1024, 1024)):
        rows, _ = _core.distance_rows(a, "euclidean", r0, r1)
        assert np.array_equal(rows, D[r0:r1])
    p = write_distance_matrix(tmp_path / "d.h5", a, rows_per_chunk=300)
    with h5py.File(p) as f:
        assert np.array_equal(f["distances"][...], D) and f["distances"].attrs["metric"] == "euclidean"
    assert not (tmp_path / "d.h5.partial").exists()


def test_summary_against_numpy():
    rng = np.random.default_rng(5)
    n = 900
    labels = np.where(rng.random(n) < 0.3, "unsafe", "safe")
    labels[:2] = "jb"  # a group of two
    a = rng.standard_normal((n, 20)).astype(np.float32) + (labels == "unsafe")[:, None] * 1.5
    s = distance_summary(a, labels, k=7)
    D = _ref(a, a, "euclidean")
    np.fill_diagonal(D, 0)
    groups = sorted(set(labels))
    assert s.groups == groups
    for gi, g in enumerate(groups):
        sel = labels == g
        sums = D[:, sel].sum(1)
        cnt = sel.sum() - sel.astype(int)
        np.testing.assert_allclose(s.mean_to_group[:, gi], sums / cnt, rtol=1e-6)
    # silhouette: (b - a) / max(a, b), a = own-group mean, b = nearest other group mean
    own = np.array([s.mean_to_group[i, groups.index(labels[i])] for i in range(n)])
    other = np.array([min(s.mean_to_group[i, j] for j, g in enumerate(groups) if g != labels[i]) for i in range(n)])
    np.testing.assert_allclose(s.silhouette, (other - own) / np.maximum(own, other), rtol=1e-9)
    # kNN: the 7 nearest others, ties by index; purity = share with the same label
    Dk = D + np.diag(np.full(n, np.inf))
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), Dk), axis=1)[:, :7]
    assert np.array_equal(s.knn_index, order)
    np.testing.assert_allclose(s.knn_purity, (labels[order] == labels[:, None]).mean(1))
    assert s.silhouette_by_group(labels)["unsafe"] > 0


def test_bad_input():
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="metric"):
        pairwise_distances(a, metric="manhattan")
    with pytest.raises(ValueError, match="features"):
        pairwise_distances(a, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        pairwise_distances(np.zeros(3))
    bad = a.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2, column 1"):
        pairwise_distances(bad)
    with pytest.raises(ValueError, match="one entry per row"):
        distance_summary(a, [0, 1])
    assert pysafe.pairwise_distances is pairwise_distances
    assert pairwise_distances(np.zeros((0, 3))).shape == (0, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_features_and_odd_widths(dtype):
    """d = 0 (no GEMM runs) gives all-zero distances; widths that are not a multiple of any vector length
    exercise the vectorised pass's tails, one column up to 37."""
    for metric in ("euclidean", "cosine"):
        got = pairwise_distances(np.zeros((3, 0), dtype), np.zeros((4, 0), dtype), metric)
        assert got.shape == (3, 4) and np.all(got == (0.0 if metric == "euclidean" else 1.0))
    rng = np.random.default_rng(5)
    for m in (1, 7, 15, 17, 37):
        a, b = rng.standard_normal((9, 20)).astype(dtype), rng.standard_normal((m, 20)).astype(dtype)
        assert _rel_err(pairwise_distances(a, b), _ref(a, b, "euclidean")) <= (1e-5 if dtype == np.float32 else 1e-12)

"""Exact distances between activation sets, and the cluster summaries built on them (docs/analyses.md).

The work is done by the native core (``csrc/linalg/distance.cpp``): blocked GEMMs on data centred in f64
(Euclidean) or normalised in f64 (cosine), f64 norms, and a difference-first f64 recomputation of every
entry whose Gram-identity value could have lost accuracy to cancellation (near-duplicate points, large
common offsets). Self distances are exactly symmetric with an exactly zero diagonal. The summaries stream
over blocks and never hold the n×n matrix.

    >>> import numpy as np, pysafe
    >>> a = np.random.default_rng(0).standard_normal((1000, 64), dtype=np.float32)
    >>> D = pysafe.pairwise_distances(a)                  # 1000×1000 float32, zero diagonal
    >>> s = pysafe.distance_summary(a, labels=np.arange(1000) % 2, k=10)
    >>> s.silhouette.shape, s.knn_purity.shape
    ((1000,), (1000,))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pysafe._loader import _core
from pysafe.backend import engine_device

METRICS = ("euclidean", "cosine")


def _as_matrix(x, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (points × features), got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        if not np.issubdtype(a.dtype, np.number):
            raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has a non-finite value at row {bad[0]}, column {bad[1]}")
    return np.ascontiguousarray(a)


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def pairwise_distances(a, b=None, metric: str = "euclidean", device="cpu") -> np.ndarray:
    """Exact pairwise distances between the rows of ``a`` (n×d) and ``b`` (m×d), or of ``a`` with itself.

    Args:
        a, b: NumPy arrays, float32 or float64 (other numeric types are computed in float64). ``b`` is
            cast to ``a``'s precision. ``b=None``: ``a`` against itself.
        metric: ``"euclidean"`` or ``"cosine"`` (1 − cos; a zero row is at distance 1 from every other
            row, sklearn's convention).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (:mod:`pysafe.backend`): where the GEMMs and the
            per-entry pass run; the result is the same array on the host either way. torch tensors are
            accepted (CUDA ones too; they are copied to the host first, as the preparation runs there).

    Returns:
        The n×m array of distances in ``a``'s precision (float32 for float32 input). Relative error against
        float64 ≤ 1e-5 per entry for float32 input; self distances are symmetric with a zero diagonal.
    """
    index = engine_device(device)
    a = _as_matrix(a, "a")
    metric = _metric(metric)
    if b is not None:
        b = _as_matrix(b, "b").astype(a.dtype, copy=False)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"a has {a.shape[1]} features, b has {b.shape[1]}")
    out, _ = _core.pairwise_distances(a, b, metric, index)
    return out


@dataclass
class DistanceSummary:
    """Per-point summaries of a set's self distances (labels in ``groups`` order)."""

    groups: list                # the distinct labels, in the order of the columns below
    mean_to_group: np.ndarray   # [n, g] mean distance from each point to the other members of each group
    silhouette: np.ndarray      # [n] (b − a) / max(a, b); 0 for points alone in their group (sklearn)
    knn_index: np.ndarray       # [n, k] nearest other points (ties broken by index)
    knn_distance: np.ndarray    # [n, k]
    knn_purity: np.ndarray      # [n] share of the k nearest neighbours with the point's own label
    recomputed: int             # entries recomputed difference-first in f64

    def silhouette_by_group(self, labels) -> dict:
        labels = np.asarray(labels)
        return {g: float(self.silhouette[labels == g].mean()) for g in self.groups}


def distance_summary(a, labels, k: int = 10, metric: str = "euclidean") -> DistanceSummary:
    """Silhouette, k-nearest-neighbour purity and mean distances to each group, streamed in blocks
    (memory O(n·(g + k)), never the n×n matrix).

    Args:
        a: n×d activations (float32 or float64).
        labels: n group labels (any hashable values; at least two groups for the silhouette).
        k: neighbours for the purity (clipped to n − 1).
        metric: ``"euclidean"`` or ``"cosine"``.
    """
    a = _as_matrix(a, "a")
    metric = _metric(metric)
    labels = np.asarray(labels)
    if labels.shape != (a.shape[0],):
        raise ValueError(f"labels must have one entry per row of a ({a.shape[0]}), got shape {labels.shape}")
    groups, codes = np.unique(labels, return_inverse=True)
    n, g = a.shape[0], len(groups)
    k = int(max(0, min(k, n - 1)))
    sums, idx, dist, stats = _core.distance_summary(a, codes.astype(np.int64), g, k, metric)
    counts = np.bincount(codes, minlength=g).astype(np.float64)
    denom = np.repeat(counts[None, :], n, axis=0)
    denom[np.arange(n), codes] -= 1  # a point is not its own neighbour
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_to = np.where(denom > 0, sums / denom, np.nan)
    own = mean_to[np.arange(n), codes]
    other = mean_to.copy()
    other[np.arange(n), codes] = np.inf
    nearest_other = np.min(np.where(np.isnan(other), np.inf, other), axis=1) if g > 1 else np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        sil = (nearest_other - own) / np.maximum(own, nearest_other)
    sil = np.where(denom[np.arange(n), codes] > 0, sil, 0.0)  # singletons: 0 (sklearn's convention)
    purity = (codes[idx] == codes[:, None]).mean(1) if k > 0 else np.full(n, np.nan)
    return DistanceSummary(groups=groups.tolist(), mean_to_group=mean_to, silhouette=sil, knn_index=idx,
                           knn_distance=dist, knn_purity=purity, recomputed=int(stats["recomputed"]))


def write_distance_matrix(path, a, metric: str = "euclidean", *, dataset: str = "distances",
                          rows_per_chunk: int = 1024) -> Path:
    """Write the full self-distance matrix of ``a`` to HDF5 in row stripes (memory O(rows_per_chunk·n)).

    The stripes are bit-identical to the rows of :func:`pairwise_distances` ``(a)``. The file is written
    under a temporary name and renamed when complete, so an interrupted run leaves no file that looks whole.
    """
    import h5py

    a = _as_matrix(a, "a")
    metric = _metric(metric)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    n = a.shape[0]
    rows = max(1, int(rows_per_chunk))
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset(dataset, shape=(n, n), dtype=a.dtype, chunks=(min(rows, max(n, 1)), max(n, 1)) if n else None)
        ds.attrs["metric"] = metric
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            block, _ = _core.distance_rows(a, metric, r0, r1)
            ds[r0:r1] = block
    tmp.replace(path)
    return path

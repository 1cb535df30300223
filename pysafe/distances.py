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


_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _on_gpu(x) -> bool:
    """Whether ``x`` lives in GPU memory: a CUDA torch tensor, an object with ``__cuda_array_interface__``
    (CuPy, Numba, ...) or a DLPack producer on a CUDA device."""
    if getattr(x, "is_cuda", False) is True:
        return True
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None and not hasattr(x, "detach"):
        try:
            return int(dev()[0]) in _DLPACK_CUDA
        except Exception:  # noqa: BLE001 - not a usable DLPack producer: treated as a host array
            return False
    return False


@dataclass
class _GpuMatrix:
    """A C-contiguous float32/float64 matrix in GPU memory: its address, shape and dtype; ``owner``
    keeps the memory alive while the engine reads it."""

    ptr: int
    shape: tuple
    dtype: type
    owner: object


def _gpu_matrix(x, name: str, index: int, dtype=None) -> _GpuMatrix:
    """``x`` as the engine reads it on GPU ``index``, without leaving the GPU. torch tensors (and DLPack
    producers, through torch) are made contiguous and float32/float64 there; ``__cuda_array_interface__``
    objects must already be C-contiguous float32 or float64. A host array (the other operand of a
    mixed pair) is copied to the GPU with torch."""
    torch = None
    if not hasattr(x, "__cuda_array_interface__") or hasattr(x, "detach"):
        try:
            import torch
        except ImportError:
            raise TypeError(f"{name}: only objects with __cuda_array_interface__ can be used on the GPU without "
                            f"PyTorch installed, got {type(x).__name__}") from None
    if torch is not None:
        if hasattr(x, "detach"):
            t = x.detach()
        elif hasattr(x, "__dlpack__") and _on_gpu(x):
            t = torch.from_dlpack(x)
        else:
            t = torch.as_tensor(np.asarray(x))
        if not t.is_cuda:  # the host operand of a mixed pair
            t = t.to(f"cuda:{index}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (points × features), got shape {tuple(t.shape)}")
        if dtype is not None:
            t = t.to(torch.float64 if dtype == np.float64 else torch.float32)
        elif t.dtype not in (torch.float32, torch.float64):
            if t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"{name} must be real numeric, got dtype {t.dtype}")
            t = t.to(torch.float64)
        t = t.contiguous()
        return _GpuMatrix(int(t.data_ptr()), tuple(t.shape), np.float64 if t.dtype == torch.float64 else np.float32,
                          t)
    cai = x.__cuda_array_interface__
    shape, typestr = tuple(cai["shape"]), cai["typestr"]
    kinds = {"<f4": np.float32, "<f8": np.float64}
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (points × features), got shape {shape}")
    if typestr not in kinds or (dtype is not None and kinds[typestr] != dtype):
        want = "float64" if dtype == np.float64 else "float32" if dtype is not None else "float32 or float64"
        raise TypeError(f"{name} on the GPU must be {want} (convert it there first), got typestr {typestr!r}")
    item = np.dtype(kinds[typestr]).itemsize
    if cai.get("strides") not in (None, (shape[1] * item, item)) and shape[0] > 1:
        raise ValueError(f"{name} on the GPU must be C-contiguous (make a contiguous copy there first)")
    return _GpuMatrix(int(cai["data"][0]), shape, kinds[typestr], x)


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
            per-entry pass run; the result is the same array on the host either way. Inputs already on
            that GPU (CUDA torch tensors, objects with ``__cuda_array_interface__`` or CUDA DLPack
            producers) are used where they are: the centring or normalisation and the norms run on the
            GPU too, and only the rows of the rare entries recomputed in float64 are copied to the host.
            With ``device="cpu"`` they are copied to the host first.

    Returns:
        The n×m array of distances in ``a``'s precision (float32 for float32 input). Relative error against
        float64 ≤ 1e-5 per entry for float32 input; self distances are symmetric with a zero diagonal.
    """
    index = engine_device(device)
    metric = _metric(metric)
    if index >= 0 and (_on_gpu(a) or (b is not None and _on_gpu(b))):
        ga = _gpu_matrix(a, "a", index)
        gb = None if b is None else _gpu_matrix(b, "b", index, ga.dtype)
        if gb is not None and gb.shape[1] != ga.shape[1]:
            raise ValueError(f"a has {ga.shape[1]} features, b has {gb.shape[1]}")
        out, _ = _core.pairwise_distances_resident(ga.ptr, ga.shape[0], ga.shape[1], None if gb is None else gb.ptr,
                                                   0 if gb is None else gb.shape[0], ga.dtype == np.float64, metric,
                                                   index)
        return out
    a = _as_matrix(a, "a")
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

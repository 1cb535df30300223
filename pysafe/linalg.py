"""Thin, checked wrappers over the native core's reader and linear algebra."""

from __future__ import annotations

import os

import numpy as np

from pysafe._loader import _core
from pysafe.backend import build_info, engine_device  # noqa: F401  (build_info: re-exported)


def read_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header (docs/metrics.md) and return its entries and metadata.

    Raises:
        FileNotFoundError: no such file.
        HeaderError: the header is malformed; ``.code`` names the condition.
    """
    return _core.read_header(os.fspath(path))


def read_tensor(path: str | os.PathLike, name: str, dtype: str | None = None) -> np.ndarray:
    """Read one tensor of a safetensors file through the native reader.

    Args:
        path: a ``.safetensors`` file.
        name: the tensor's name, verbatim.
        dtype: ``None`` returns the stored values in their NumPy dtype where NumPy has one (a copy,
            complex64 for C64) and float32 for BF16/F8/F4; ``"f32"`` or ``"f64"`` upcasts. F6 tensors,
            and shapes no NumPy array can take, raise :class:`~pysafe.errors.CheckpointError`.

    Returns:
        ndarray with the tensor's shape.
    """
    f = _core.SafetensorsFile(os.fspath(path))
    entry = next((e for e in f.entries() if e["name"] == name), None)
    if entry is None:
        from pysafe.errors import TensorNotFoundError, printable

        raise TensorNotFoundError(f"{path}: no tensor '{printable(name)}'")
    raw = f.buffer(name)
    st = entry["dtype"]
    shape = list(entry["shape"])
    from pysafe.checkpoint import UNSUPPORTED_DTYPES, TensorInfo, _check_numpy_shape
    from pysafe.errors import CheckpointError, printable

    native = dtype is None and st in _NUMPY
    if st in UNSUPPORTED_DTYPES and not native:
        raise CheckpointError(f"{path}: tensor '{printable(name)}' cannot be read as real values: "
                              f"{UNSUPPORTED_DTYPES[st]}")
    _check_numpy_shape(TensorInfo(name, st, tuple(shape), os.fspath(path), 0),
                       np.dtype(_NUMPY[st]).itemsize if native else (8 if dtype == "f64" else 4))
    if native:
        return np.frombuffer(raw, dtype=_NUMPY[st]).reshape(shape).copy()
    if dtype not in (None, "f32", "f64"):
        raise ValueError(f"dtype must be None, 'f32' or 'f64', got {dtype!r}")
    return _core.upcast(raw, st, shape, dtype == "f64")


_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8"}


def sin_theta_chance(n: int, k: int) -> float:
    """E[sin θ] between a uniformly random unit vector of R^n and a fixed k-dimensional subspace:
    Γ(n/2)·Γ((n−k+1)/2) / (Γ((n−k)/2)·Γ((n+1)/2)), the chance level of a mean sin θ (docs/metrics.md).
    The engine's own definition (one for the whole package)."""
    if not (0 <= k <= n) or n < 1:
        raise ValueError(f"sin_theta_chance: need 0 <= k <= n and n >= 1, got n={n}, k={k}")
    return float(_core.sin_theta_chance(int(n), int(k)))


def sin_theta(U_base: np.ndarray, U: np.ndarray) -> np.ndarray:
    """sin θ_i = ‖(I − U_base U_baseᵀ) u_i‖ of each column u_i of ``U`` (n×k) to the column space of
    ``U_base`` (n×k_base, orthonormal columns), each clipped to [0, 1]: the engine's metric behind the
    records' sin_theta_left/right. Float64 arithmetic when either input is float64."""
    U_base, U = np.asarray(U_base), np.asarray(U)
    if U_base.ndim != 2 or U.ndim != 2 or U_base.shape[0] != U.shape[0]:
        raise ValueError(f"sin_theta: expected two 2-D arrays with the same number of rows, got shapes "
                         f"{U_base.shape} and {U.shape}")
    return _core.sin_theta(U_base, U)[0]


def truncated_svd(A: np.ndarray, *, rank: int | None = None, energy: float = 0.9, exact: bool = False,
                  max_rank: int | None = None, exact_max_dim: int = 1024, oversample: int = 10,
                  power_iters: int | None = None, tol: float = 1e-4, full_spectrum: bool = False, seed: int = 0,
                  device="cpu"):
    """Truncated SVD of a 2-D float32/float64 array with the engine's rules (docs/metrics.md).

    Returns:
        (U (m×r), S (r,), Vt (r×n), info) with info["k"] the kept rank, info["method"] (exact, gram_eig or
        subspace_iteration), info["rel_error"] (bound on the top-k values' relative error), info["err"]
        (per-value absolute bounds), info["tol_reached"], info["energy_reached"] and, when computed,
        info["spectrum"] (all singular values). ``device`` ("cpu", "cuda", "cuda:N"): where block Krylov
        and the Gram matrix of gram_eig run (:mod:`pysafe.backend`).
    """
    index = engine_device(device)
    A = np.asarray(A)
    if A.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {A.shape}")
    if A.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected float32 or float64, got {A.dtype}")
    o = svd_options(rank=rank, energy=energy, exact=exact, max_rank=max_rank, exact_max_dim=exact_max_dim,
                    oversample=oversample, power_iters=power_iters, tol=tol, full_spectrum=full_spectrum, seed=seed,
                    device=index)
    return _core.truncated_svd(np.ascontiguousarray(A), o)


def svd_options(*, rank: int | None, energy: float, exact: bool, max_rank: int | None, exact_max_dim: int,
                oversample: int, power_iters: int | None, tol: float, full_spectrum: bool, seed: int,
                device: int = -1):
    """The engine's SVD settings (``_core.SvdOptions``; None becomes its -1 sentinel: "not set"; ``device``
    is the engine's device index, -1 for the CPU, N for cuda:N)."""
    o = _core.SvdOptions()
    o.rank = -1 if rank is None else int(rank)
    o.energy = float(energy)
    o.exact = exact
    o.exact_max_dim = exact_max_dim
    o.max_rank = -1 if max_rank is None else int(max_rank)
    o.oversample = oversample
    o.power_iters = -1 if power_iters is None else int(power_iters)
    o.tol = float(tol)
    o.full_spectrum = full_spectrum
    o.seed = seed
    o.device = device
    return o

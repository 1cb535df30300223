"""Where the engine runs: the ``device`` argument of :func:`pysafe.compare`,
:func:`pysafe.pairwise_distances` and ``pysafe analyze --device``.

``"cpu"`` (the default) runs the OpenBLAS/LAPACK backend. ``"cuda"`` or ``"cuda:N"`` runs the same
algorithms on GPU N: the randomized SVD's products, orthonormalisations and residuals, the Gram
matrix of the exact spectrum, and the GEMMs and per-entry pass of the pairwise distances. This module
is the only place that looks at what the build contains (``build_info()``); asking for a GPU that the
build or the machine does not have raises :class:`~pysafe.errors.DeviceUnavailableError` with one line
naming what is missing.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys

from pysafe._loader import _core
from pysafe.errors import DeviceUnavailableError

__all__ = ["parse_device", "engine_device", "device_name", "build_info"]

_SPEC = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(device) -> int:
    """The engine's device index for ``device``: -1 for the CPU, N for ``cuda:N``.

    Accepts None or ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``), ``"cuda:N"`` and ``torch.device`` objects.
    Only the spelling is checked here; :func:`engine_device` also checks that the device exists.
    """
    if device is None:
        return -1
    spec = str(device).strip().lower()
    m = _SPEC.match(spec)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if m.group(1) == "cpu":
        return -1
    return int(m.group(2) or 0)


def device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"


def engine_device(device) -> int:
    """:func:`parse_device`, then make sure the device can be used: a CUDA build, a visible GPU with
    that index, and cuBLAS/cuSOLVER libraries (preloaded from the nvidia-* wheels, as PyTorch does)."""
    index = parse_device(device)
    if index < 0:
        return index
    name = device_name(index)
    if not _core.build_info()["cuda"]:
        raise DeviceUnavailableError(
            f"device {name} requested but this pysafe build has no CUDA support (build_info()['cuda'] is False); "
            f"rebuild it where nvcc and the nvidia-cublas/nvidia-cusolver packages are installed (docs/gpu.md)")
    count = _core.cuda_device_count()
    if count == 0:
        raise DeviceUnavailableError(f"device {name} requested but no CUDA device is visible (no NVIDIA driver or "
                                     f"GPU on this machine, or CUDA_VISIBLE_DEVICES hides them)")
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
        raise DeviceUnavailableError(f"device {name} requested but this machine has {count} CUDA device"
                                     f"{'s' if count > 1 else ''} ({have})")
    _preload_math_libraries()
    _core.backend.name(index)  # creates the backend: a missing library fails here, in one line
    return index


#: the libraries the CUDA backend opens, with those they need first (the nvidia-* wheels' folders are
#: not on the loader's path: PyTorch preloads them the same way)
_LIBS = ("nvJitLink", "cusparse", "cublasLt", "cublas", "cusolver")


def _preload_math_libraries() -> None:
    for lib in _LIBS:
        for entry in sys.path:
            hits = sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", f"lib{lib}.so.*")))
            if hits:
                try:
                    ctypes.CDLL(hits[0], mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                break


def build_info() -> dict:
    """What this build contains: version, BLAS, threads, ``cuda`` (compiled in) and ``cuda_devices``
    (visible GPUs); a CUDA build adds the runtime and driver versions, the devices' names and the
    cuBLAS/cuSOLVER libraries found."""
    if _core.build_info()["cuda"] and _core.cuda_device_count():
        _preload_math_libraries()
    info = dict(_core.build_info())
    info["cuda_devices"] = _core.cuda_device_count()
    return info

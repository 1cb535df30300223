"""Load the native core. libscipy_openblas is preloaded from the scipy-openblas32 wheel so the
extension finds it however site-packages is laid out (its RPATH covers the usual layout too)."""

from __future__ import annotations

import ctypes
import os


def _preload_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:  # the RPATH may still find it; the import below says clearly if not
        return
    lib = os.path.join(scipy_openblas32.get_lib_dir(), "lib" + scipy_openblas32.get_library() + ".so")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()

from pysafe import _core  # noqa: E402

__all__ = ["_core"]

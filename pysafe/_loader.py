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

try:
    from pysafe import _core  # noqa: E402
except ImportError as exc:  # typically: importing the source tree, where the extension was never built
    here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(f"pysafe's native core (pysafe._core) is not built in {here}: install with `pip install .` "
                      "and run from outside the source tree (or use an editable install)") from exc

__all__ = ["_core"]

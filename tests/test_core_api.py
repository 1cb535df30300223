"""The binding boundary: the stub matches the module, and every build exports the same API."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pysafe
from pysafe import _core


def _stub_names():
    tree = ast.parse((Path(pysafe.__file__).parent / "_core.pyi").read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_stub_lists_every_core_name():
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public == _stub_names()


def test_build_info_and_cuda_api_exist_in_every_build():
    info = pysafe.build_info()
    assert isinstance(info["cuda"], bool)
    assert "OpenBLAS" in info["blas"]
    assert info["cuda_devices"] == _core.cuda_device_count() >= 0
    assert info["version"] == pysafe.__version__


def test_public_api_exports():
    for name in pysafe.__all__:
        assert hasattr(pysafe, name), name
    assert issubclass(pysafe.HeaderError, ValueError) and issubclass(pysafe.HeaderError, pysafe.PysafeError)
    assert issubclass(pysafe.TensorNotFoundError, KeyError)
    assert issubclass(pysafe.DeviceUnavailableError, RuntimeError)


def test_threads_setting_round_trips():
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        assert _core.get_num_threads() == 1
    finally:
        _core.set_num_threads(0)
    assert _core.get_num_threads() == (os.cpu_count() or 1)
    assert before >= 1

"""The native reader against files written by the safetensors library: bit-exact values, every dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

import pysafe
from pysafe import _core

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
                "U8": np.uint8, "BOOL": np.bool_}


def _values(dtype, rng, shape=(7, 5)):
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[0] = np.finfo(dtype).tiny  # smallest normal
    x.flat[1] = -np.finfo(dtype).max
    if dtype == np.float16:
        x.flat[2] = np.float16(6e-8)  # a subnormal
    return x


@pytest.mark.parametrize("st_dtype", list(NUMPY_DTYPES))
def test_numpy_dtypes_bit_exact(tmp_path, st_dtype):
    rng = np.random.default_rng(0)
    x = _values(NUMPY_DTYPES[st_dtype], rng)
    path = tmp_path / "t.safetensors"
    save_numpy({"x": x, "empty": np.zeros((0, 3), NUMPY_DTYPES[st_dtype])}, str(path))
    header = pysafe.read_header(path)
    entry = next(e for e in header["entries"] if e["name"] == "x")
    assert entry["dtype"] == st_dtype and list(entry["shape"]) == [7, 5]
    got = pysafe.read_tensor(path, "x")
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.tobytes() == x.tobytes()
    assert pysafe.read_tensor(path, "empty").shape == (0, 3)
    # upcast path: exact where the value is representable in f64
    up = pysafe.read_tensor(path, "x", dtype="f64")
    if st_dtype not in ("I64", "U64"):
        np.testing.assert_array_equal(up, x.astype(np.float64))


@pytest.mark.parametrize("torch_dtype,st_dtype", [(torch.bfloat16, "BF16"), (torch.float16, "F16"),
                                                  (torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_low_precision_float_upcast_bit_exact(tmp_path, torch_dtype, st_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 33, generator=g) * 3).to(torch_dtype)
    # every bit pattern of 8-bit formats, including NaN, Inf (e5m2) and subnormals
    if torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.arange(256, dtype=torch.uint8).view(torch_dtype).reshape(16, 16)
    path = tmp_path / "t.safetensors"
    save_torch({"x": x}, str(path))
    assert pysafe.read_header(path)["entries"][0]["dtype"] == st_dtype
    ref = load_torch(str(path))["x"].float().numpy()
    got = pysafe.read_tensor(path, "x", dtype="f32")
    assert got.dtype == np.float32
    # bit-exact including NaN payload positions
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    mask = ~np.isnan(ref)
    assert got[mask].tobytes() == ref[mask].tobytes()


def test_all_bf16_bit_patterns_upcast_exactly():
    pats = np.arange(65536, dtype=np.uint16)
    got = _core.upcast(pats.tobytes(), "BF16", [65536], False)
    ref = torch.from_numpy(pats.astype(np.int16)).view(torch.bfloat16).float().numpy()
    same = (got.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(got) & np.isnan(ref))
    assert same.all()


def test_all_f16_bit_patterns_upcast_exactly():
    pats = np.arange(65536, dtype=np.uint16)
    got = _core.upcast(pats.tobytes(), "F16", [65536], True)
    ref = pats.view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert (got[~np.isnan(ref)] == ref[~np.isnan(ref)]).all()


def test_metadata_and_offsets_match_library(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal((i + 1, 3)).astype(np.float32) for i in range(5)}
    path = tmp_path / "m.safetensors"
    save_numpy(tensors, str(path), metadata={"format": "np", "note": "ünïcode"})
    h = pysafe.read_header(path)
    assert h["metadata"] == {"format": "np", "note": "ünïcode"}
    assert h["file_size"] == path.stat().st_size
    ends = [e["data_offsets"][1] for e in h["entries"]]
    assert max(ends) == h["file_size"] - h["data_start"]
    for name, x in tensors.items():
        np.testing.assert_array_equal(pysafe.read_tensor(path, name), x)


def test_buffer_view_is_read_only_and_keeps_mapping_alive(tmp_path):
    x = np.arange(12, dtype=np.float32)
    path = tmp_path / "v.safetensors"
    save_numpy({"x": x}, str(path))
    buf = _core.SafetensorsFile(str(path)).buffer("x")  # the file object goes out of scope here
    assert not buf.flags.writeable
    assert buf.view(np.float32).tolist() == x.tolist()
    with pytest.raises(ValueError):
        buf[0] = 1


def test_fused_delta_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1000, generator=g).to(torch.bfloat16)
    tuned = (base.float() + 1e-3 * torch.randn(1000, generator=g)).to(torch.bfloat16)
    b = base.view(torch.int16).numpy().tobytes()
    t = tuned.view(torch.int16).numpy().tobytes()
    delta, stats = _core.fused_delta(t, "BF16", b, "BF16", 1000, False)
    ref = tuned.double().numpy() - base.double().numpy()
    np.testing.assert_array_equal(delta.astype(np.float64), ref)  # bf16 differences are exact in f32
    assert stats["nonfinite_base"] == 0 and stats["nonfinite_tuned"] == 0
    assert stats["sumsq_delta"] == pytest.approx(float((ref ** 2).sum()), rel=1e-12)
    assert stats["sumsq_base"] == pytest.approx(float((base.double().numpy() ** 2).sum()), rel=1e-12)

"""The reader's error contract under hostile files (issue 13, reader items 1-6 and 11).

Each test is built from the minimal file of a failure found by differential fuzzing; the reference
for what is acceptable is the ``safetensors`` library (0.8) and, for decoded values, torch's own
dtypes or a decoding written here from the OCP MX specification.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import pysafe
from pysafe import _core
from pysafe.checkpoint import Checkpoint
from pysafe.errors import CheckpointError, HeaderError, ShardIndexError


def raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def json_file(path: Path, header: dict, data: bytes = b"") -> Path:
    return raw_file(path, json.dumps(header).encode(), data)


def assert_one_printable_line(msg: str, path: Path) -> None:
    assert str(path) in msg, msg
    bad = [c for c in msg if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"control characters {bad!r} in {msg!r}"
    msg.encode("utf-8")  # no lone surrogates


def reference_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any refusal
        return False


# -- items 1 and 2: messages are valid UTF-8, printable, whole ------------------------------------
HOSTILE = {
    # a byte-order mark, then {}: the 8-byte length 5 followed by EF BB BF 7B 7D
    "bom": (b"\xef\xbb\xbf{}", "invalid_json", ["U+FEFF", "byte-order mark", "at header byte 0"]),
    "non_ascii_value": ('{"a":é}'.encode(), "invalid_json", ["U+00E9 'é'", "at header byte 5"]),
    "nul_value": (b'{"a":\x00}', "invalid_json", ["\\u0000", "at header byte 5"]),
    "bad_escape": (b'{"a\\\xc3\xa9":1}', "invalid_json", ["backslash followed by U+00E9", "at header byte 4"]),
    "nul_in_name": (json.dumps({"x\u0000y": {"dtype": "Q", "shape": [], "data_offsets": [0, 0]}}).encode(),
                    "unknown_dtype", ["tensor 'x\\u0000y'", "(expected one of F64"]),
    "esc_in_name": (json.dumps({"\u001b[2J": {"dtype": "Q", "shape": [], "data_offsets": [0, 0]}}).encode(),
                    "unknown_dtype", ["tensor '\\u001b[2J'", "(expected one of F64"]),
    "esc_in_dtype": (json.dumps({"w": {"dtype": "\u001b[2J\u0000", "shape": [], "data_offsets": [0, 0]}}).encode(),
                     "unknown_dtype", ["dtype '\\u001b[2J\\u0000'"]),
    "esc_in_unknown_key": (json.dumps({"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "\u001b": 1}}
                                      ).encode(), "invalid_entry", ["unexpected key '\\u001b'"]),
    "c1_in_name": (json.dumps({"a\u009bb\u202e": {"dtype": "Q", "shape": [], "data_offsets": [0, 0]}},
                              ensure_ascii=False).encode(), "unknown_dtype", ["'a\\u009bb\\u202e'"]),
    "duplicate_escaped": (b'{"\\u001b":{}, "\\u001b":{}}', "invalid_json", ["duplicate key '\\u001b'"]),
}


@pytest.mark.parametrize("reader", ["read_header", "SafetensorsFile", "Checkpoint.open"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=str)
def test_hostile_header_messages(tmp_path, case, reader):
    header, code, fragments = HOSTILE[case]
    path = raw_file(tmp_path / "m.safetensors", header)
    fn = {"read_header": pysafe.read_header, "SafetensorsFile": _core.SafetensorsFile,
          "Checkpoint.open": Checkpoint.open}[reader]
    with pytest.raises(HeaderError) as info:  # never UnicodeDecodeError, never a cut message
        fn(str(path))
    assert info.value.code == code
    msg = str(info.value)
    assert_one_printable_line(msg, path)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert not reference_accepts(path)


def test_cli_prints_one_line_naming_the_file(tmp_path):
    for case in ("bom", "esc_in_name", "nul_value"):
        path = raw_file(tmp_path / f"{case}.safetensors", HOSTILE[case][0])
        r = subprocess.run([sys.executable, "-m", "pysafe", "analyze", str(path), str(path), "--out",
                            str(tmp_path / f"out_{case}")], capture_output=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 1
        err = r.stderr.decode("utf-8")  # valid UTF-8
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("Error: ") and str(path) in lines[0], err
        assert "\x1b" not in err and "\x00" not in err and "codec can't decode" not in err
        assert not (tmp_path / f"out_{case}").exists()


def test_shard_index_messages(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    index = d / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"a": \xc3\xa9}}')
    with pytest.raises(ShardIndexError) as info:
        Checkpoint.open(d)
    assert "U+00E9 'é'" in str(info.value)
    assert_one_printable_line(str(info.value), index)
    index.write_bytes(b'\xef\xbb\xbf{"weight_map": {}}')
    with pytest.raises(ShardIndexError) as info:
        Checkpoint.open(d)
    assert "byte-order mark" in str(info.value)
    index.write_text(json.dumps({"weight_map": {"\u001b[2Jx\u0000": "../\u001b]0;evil\u0007"}}))
    with pytest.raises(ShardIndexError) as info:
        Checkpoint.open(d)
    msg = str(info.value)
    assert_one_printable_line(msg, index)
    assert "weight_map['\\u001b[2Jx\\u0000'] names shard '../\\u001b]0;evil\\u0007'" in msg


def test_tensor_not_found_escapes_the_name(tmp_path):
    path = json_file(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     b"\0" * 4)
    f = _core.SafetensorsFile(str(path))
    with pytest.raises(pysafe.TensorNotFoundError) as info:
        f.buffer("x\x00\x1b[2J")
    assert "'x\\u0000\\u001b[2J'" in str(info.value)
    with pytest.raises(pysafe.TensorNotFoundError) as info:
        Checkpoint.open(path).read("w\x1b")
    assert "\x1b" not in str(info.value)


# -- item 3: linear time in the number of keys ----------------------------------------------------
def _many_keys_file(path: Path, n: int, kind: str) -> Path:
    if kind == "metadata":
        body = ",".join(f'"k{i}":"v"' for i in range(n))
        header = '{"__metadata__":{' + body + "}}"
    else:
        header = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    return raw_file(path, header.encode())


@pytest.mark.parametrize("kind", ["metadata", "tensors"])
def test_parse_time_is_linear_in_the_key_count(tmp_path, kind):
    # Before: duplicate detection rescanned every earlier key (100k metadata keys took 10.8 s).
    n = 100_000
    path = _many_keys_file(tmp_path / "k.safetensors", n, kind)
    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        ref_keys = len(f.keys()) if kind == "tensors" else len(f.metadata())
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = _core.SafetensorsFile(str(path))
    t_ours = time.perf_counter() - t0
    got = len(f.entries()) if kind == "tensors" else len(f.metadata)
    assert got == ref_keys == n
    assert t_ours < max(1.0, 10 * t_ref), (t_ours, t_ref)


def test_lookup_by_name_is_not_linear(tmp_path):
    # Before: Header::find scanned the entries (n lookups: n^2 / 2 string compares).
    n = 60_000
    header = "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)) + "}"
    path = raw_file(tmp_path / "n.safetensors", header.encode(), bytes(i % 256 for i in range(n)))
    f = _core.SafetensorsFile(str(path))
    t0 = time.perf_counter()
    for i in range(0, n, 1):
        assert f.buffer(f"t{i}")[0] == i % 256
    assert time.perf_counter() - t0 < 5.0


# -- item 4: memory bounded by a small multiple of the header -------------------------------------
RSS_PROBE = textwrap.dedent("""
    import sys
    from pysafe import _core
    from pysafe.errors import HeaderError
    def hwm():  # peak RSS of this process (ru_maxrss would keep the parent's across fork + exec)
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
    before = hwm()
    try:
        _core.read_header(sys.argv[1])
        print("accepted", end=" ")
    except HeaderError as e:
        print(e.code, end=" ")
    print(hwm() - before)
""")


def _peak_rss_delta(path: Path) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, timeout=120,
                       cwd=path.parent)
    assert r.returncode == 0, r.stderr
    code, delta = r.stdout.split()
    return code, int(delta)


@pytest.mark.parametrize("where", ["unknown_key", "metadata", "nested"])
def test_memory_of_an_ignored_array_is_bounded(tmp_path, where):
    # Before: a 40 MB header holding a 20M-element array peaked at 3.76 GB (a tree node per element).
    n = 5_000_000
    arr = "[" + ",".join(["0"] * n) + "]"
    if where == "unknown_key":
        header = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":' + arr + "}}"
        data, expect = b"\0" * 4, "invalid_entry"
    elif where == "metadata":
        header = '{"__metadata__":{"a":' + arr + "}}"
        data, expect = b"", "invalid_metadata"
    else:
        header = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{"y":[' + arr + ',{"z":' + arr + "}]}}}"
        data, expect = b"\0" * 4, "invalid_entry"
    path = raw_file(tmp_path / "big.safetensors", header.encode(), data)
    code, delta = _peak_rss_delta(path)
    assert code == expect
    # the header bytes themselves (read once) plus a little; the old tree took ~100 bytes per element
    assert delta < 3 * len(header) + 32 * 2**20, (delta, len(header))


def test_header_at_the_cap_is_a_header_error(tmp_path):
    # Before: a 100 MB header of an array under an ignored key died with MemoryError: std::bad_alloc.
    cap = 100 * 1000 * 1000
    prefix = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":['
    body = b"0," * ((cap - len(prefix) - 4) // 2)
    header = prefix + body + b"0]}}"
    header += b" " * (cap - len(header))
    assert len(header) == cap
    path = raw_file(tmp_path / "cap.safetensors", header, b"\0" * 4)
    code, delta = _peak_rss_delta(path)
    assert code == "invalid_entry"
    assert delta < 3 * cap, delta


# -- item 5: the newer dtypes ---------------------------------------------------------------------
NEW_DTYPES = {"F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64}


@pytest.mark.parametrize("dtype", list(NEW_DTYPES))
@pytest.mark.parametrize("numel", [0, 1, 2, 3, 4, 5, 8, 12])
def test_new_dtype_headers_accepted_exactly_where_the_reference_accepts(tmp_path, dtype, numel):
    bits = NEW_DTYPES[dtype]
    for nbytes in sorted({numel * bits // 8, (numel * bits + 7) // 8}):
        path = json_file(tmp_path / f"{dtype}_{numel}_{nbytes}.safetensors",
                         {"x": {"dtype": dtype, "shape": [numel], "data_offsets": [0, nbytes]}}, b"\x11" * nbytes)
        ref = reference_accepts(path)
        try:
            h = pysafe.read_header(path)
            ours = True
        except HeaderError as exc:
            ours = False
            assert_one_printable_line(str(exc), path)
        assert ours == ref, (dtype, numel, nbytes, ref)
        if ours:
            assert h["entries"][0]["dtype"] == dtype


def _torch_values(path: Path) -> np.ndarray:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("x").to(torch.float32).numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    a, b = np.asarray(a, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    keep = ~np.isnan(a)
    np.testing.assert_array_equal(a[keep].view(np.uint32), b[keep].view(np.uint32))


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_new_f8_upcast_bit_exact_against_torch(tmp_path, dtype):
    # every one of the 256 codes, decoded by torch's own dtype through the reference reader
    path = json_file(tmp_path / "x.safetensors", {"x": {"dtype": dtype, "shape": [16, 16], "data_offsets": [0, 256]}},
                     bytes(range(256)))
    ours = Checkpoint.open(path).read("x")
    assert ours.dtype == np.float32 and ours.shape == (16, 16)
    _same_bits(ours, _torch_values(path))
    _same_bits(Checkpoint.open(path).read("x", dtype="f64").astype(np.float32), ours)


def _ocp_e2m1(nibble: int) -> float:
    """OCP MX v1.0 FP4 E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit; subnormal at exponent 0."""
    s = -1.0 if nibble & 8 else 1.0
    e, m = (nibble >> 1) & 3, nibble & 1
    return s * (m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


def test_f4_upcast_against_the_ocp_spec_and_the_reference_bytes(tmp_path):
    data = bytes(range(256))
    path = json_file(tmp_path / "x.safetensors", {"x": {"dtype": "F4", "shape": [16, 32], "data_offsets": [0, 256]}},
                     data)
    # the reference hands back the same packed bytes (torch.float4_e2m1fn_x2, two per element)
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor("x")
    assert t.dtype == torch.float4_e2m1fn_x2 and tuple(t.shape) == (16, 16)
    assert t.view(torch.uint8).numpy().tobytes() == data
    assert Checkpoint.open(path).buffer("x").tobytes() == data
    # first element in the low nibble, as torch and the OCP spec's packed layouts do
    expect = np.array([_ocp_e2m1(b >> (4 * k) & 0xF) for b in data for k in (0, 1)], np.float32).reshape(16, 32)
    _same_bits(Checkpoint.open(path).read("x"), expect)
    assert sorted(set(np.abs(expect).ravel().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_f4_delta_through_the_engine(tmp_path):
    # fused ΔW in the engine's convert path: tuned - base, both F4
    rng = np.random.default_rng(0)
    b, t = rng.integers(0, 256, 64, dtype=np.uint8).tobytes(), rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    delta, _ = _core.fused_delta(np.frombuffer(t, np.uint8), "F4", np.frombuffer(b, np.uint8), "F4", 128)
    dec = lambda raw: np.array([_ocp_e2m1(x >> (4 * k) & 0xF) for x in raw for k in (0, 1)], np.float32)  # noqa: E731
    _same_bits(delta, dec(t) - dec(b))


def test_complex_and_f6_get_a_skip_reason_not_an_error(tmp_path):
    c64 = (np.arange(16) + 1j * np.arange(16)).astype(np.complex64).reshape(4, 4)
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    for name, extra in (("base", 0), ("tuned", 1)):
        header = {"c": {"dtype": "C64", "shape": [4, 4], "data_offsets": [0, 128]},
                  "f6": {"dtype": "F6_E2M3", "shape": [4, 4], "data_offsets": [128, 140]},
                  "w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [140, 204]}}
        json_file(tmp_path / f"{name}.safetensors", header,
                  (c64 + extra).tobytes() + bytes(12) + (w + extra * np.eye(4, dtype=np.float32)).tobytes())
    cmp = pysafe.compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    reasons = {d["name"]: d["reason"] for d in cmp.preflight.not_matrix}
    assert "complex dtype C64" in reasons["c"]
    assert "F6_E2M3" in reasons["f6"] and "bit packing" in reasons["f6"]
    assert [r["name"] for r in cmp.records] == ["w"]
    ck = Checkpoint.open(tmp_path / "base.safetensors")
    assert ck.buffer("c").tobytes() == c64.tobytes()
    with pytest.raises(CheckpointError, match="complex dtype C64"):
        ck.read("c")
    base = tmp_path / "base.safetensors"
    np.testing.assert_array_equal(pysafe.read_tensor(base, "c"), c64)  # its own values, as NumPy has complex64
    with safe_open(str(base), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("c"), c64)
    for name, dtype in (("c", "f32"), ("f6", None), ("f6", "f64")):
        with pytest.raises(CheckpointError) as info:
            pysafe.read_tensor(base, name, dtype=dtype)
        assert_one_printable_line(str(info.value), base)


# -- item 6: headers both libraries accept that NumPy cannot hold ---------------------------------
@pytest.mark.parametrize("shape,data", [([2**63 - 1, 0], b""), ([0, 2**63 - 1], b""), ([2**62, 0, 4], b""),
                                        ([1] * 65, b"\0" * 4), ([1] * 1000, b"\0" * 4)],
                         ids=["huge_x_0", "0_x_huge", "huge_0_4", "65_dims", "1000_dims"])
def test_unrepresentable_shapes_give_a_pysafe_error(tmp_path, shape, data):
    path = json_file(tmp_path / "s.safetensors", {"w": {"dtype": "F32", "shape": shape,
                                                        "data_offsets": [0, len(data)]}}, data)
    assert reference_accepts(path)
    ck = Checkpoint.open(path)
    assert ck.tensors["w"].shape == tuple(shape)
    assert ck.buffer("w").tobytes() == data
    with pytest.raises(CheckpointError) as info:  # not a bare NumPy ValueError
        ck.read("w")
    assert type(info.value) is CheckpointError
    assert_one_printable_line(str(info.value), path)
    assert "tensor 'w'" in str(info.value)
    for dtype in (None, "f64"):
        with pytest.raises(CheckpointError) as info:
            pysafe.read_tensor(path, "w", dtype=dtype)
        assert type(info.value) is CheckpointError and "tensor 'w'" in str(info.value)


def test_shape_messages_print_integers_as_integers(tmp_path):
    path = json_file(tmp_path / "s.safetensors", {"w": {"dtype": "F32", "shape": [2**64 - 1, 2],
                                                        "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(HeaderError) as info:
        pysafe.read_header(path)
    assert "found 18446744073709551615" in str(info.value) and "e+19" not in str(info.value)
    path = json_file(tmp_path / "t.safetensors", {"w": {"dtype": "F32", "shape": [10**40, 1],
                                                        "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(HeaderError) as info:
        pysafe.read_header(path)
    assert "found 10000000000000000000000000000000000000000" in str(info.value)


# -- item 11: pickles -----------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w')",))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
def test_malicious_pickles_are_refused_in_one_line(tmp_path, protocol, payload, capfd):
    marker = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": payload(str(marker))}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as info:
            Checkpoint.open(path)
    assert not marker.exists()
    assert not caught, [str(w.message) for w in caught]  # torch's protocol warning stays inside
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    reason = msg.split("torch.load(weights_only=True): ", 1)[1]
    assert reason.endswith("(refused: only tensors are loaded)")
    assert len(reason) > len("(refused: only tensors are loaded)") + 5, msg  # the reason is not lost
    if protocol >= 4:
        assert "FRAME" in reason or "GLOBAL" in reason or "posix" in reason or "builtins" in reason, reason


def test_cli_pickle_refusal_is_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil(str(marker))}, protocol=4))
    r = subprocess.run([sys.executable, "-m", "pysafe", "analyze", str(d), str(d), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "FRAME" in r.stderr and "UserWarning" not in r.stderr
    assert not marker.exists()

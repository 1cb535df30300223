"""The engine's backends: every primitive held against NumPy float64 references, on the CPU everywhere and
on a GPU where one exists (the ``cuda`` marker), the device argument's parsing and its errors, the staging
plan of the host-to-device copies, and the algorithms end to end on a GPU against the CPU backend."""

from __future__ import annotations

import numpy as np
import pytest

import pysafe
from pysafe import _core
from pysafe.backend import engine_device, parse_device
from pysafe.errors import DeviceUnavailableError

DEVICES = [pytest.param(-1, id="cpu"), pytest.param(0, id="cuda", marks=pytest.mark.cuda)]
DTYPES = [np.float32, np.float64]
no_gpu = pytest.mark.skipif(_core.cuda_device_count() > 0, reason="this machine has a GPU")
# properties and switches of the CUDA emulator's test build (docs/gpu.md), which a real GPU does not have
emulator_only = pytest.mark.skipif(not _core.build_info().get("cuda_emulator"), reason="not the CUDA emulator's build")


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


# ---- the device argument ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, index", [(None, -1), ("cpu", -1), ("CPU", -1), ("cuda", 0), ("cuda:0", 0),
                                         ("cuda:3", 3), (" cuda:1 ", 1)])
def test_parse_device(spec, index):
    assert parse_device(spec) == index


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cpu:0", "cuda:x", "", "mps"])
def test_parse_device_refuses(spec):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        parse_device(spec)


def test_parse_device_takes_torch_devices():
    torch = pytest.importorskip("torch")
    assert parse_device(torch.device("cpu")) == -1
    assert parse_device(torch.device("cuda", 2)) == 2


@no_gpu
@pytest.mark.parametrize("call", [
    lambda: engine_device("cuda"),
    lambda: pysafe.pairwise_distances(np.ones((3, 2)), device="cuda:0"),
    lambda: pysafe.truncated_svd(np.ones((3, 2)), rank=1, device="cuda"),
    lambda: pysafe.compare("does-not-matter", "either", device="cuda"),
])
def test_gpu_request_without_gpu_is_one_clear_line(call):
    with pytest.raises(DeviceUnavailableError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and "cuda:0 requested" in msg
    what = "no CUDA support" if not _core.build_info()["cuda"] else "no CUDA device is visible"
    assert what in msg


@no_gpu
def test_core_refuses_a_gpu_backend_without_gpu():
    """The core's own check (used by the bindings directly), not only the Python pre-check."""
    with pytest.raises(DeviceUnavailableError, match="cuda:0 requested"):
        _core.backend.name(0)
    with pytest.raises(DeviceUnavailableError, match="cuda:1 requested"):
        _core.pairwise_distances(np.ones((3, 2), np.float32), None, "euclidean", 1)


def test_device_array_needs_a_gpu():
    with pytest.raises(ValueError, match="a GPU device index"):
        _core.backend.device_array(-1, np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        _core.backend.device_array(0, np.ones((2, 2), np.int32))
    if _core.cuda_device_count() == 0:
        with pytest.raises(DeviceUnavailableError, match="cuda:0 requested"):
            _core.backend.device_array(0, np.ones((2, 2), np.float32))


@no_gpu
def test_analyze_device_cuda_fails_in_one_line_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from pysafe.cli import main

    pysafe.make_pair(tmp_path / "pair", preset="tiny")
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "pair" / "base"), str(tmp_path / "pair" / "tuned"),
                                  "--out", str(out), "--device", "cuda", "--no-plots"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "cuda:0 requested" in lines[0], lines
    assert not out.exists()


@pytest.mark.cuda
def test_gpu_index_beyond_the_machine_is_one_clear_line():
    n = _core.cuda_device_count()
    have = "cuda:0" if n == 1 else f"cuda:0..cuda:{n - 1}"
    with pytest.raises(DeviceUnavailableError, match=rf"^device cuda:{n} requested but this machine has {n} "
                                                     rf"CUDA devices? \({have}\)$"):
        engine_device(f"cuda:{n}")
    with pytest.raises(DeviceUnavailableError, match=rf"^cuda:{n} requested but this machine has {n} CUDA"):
        _core.backend.name(n)


@pytest.mark.cuda
@pytest.mark.parametrize("lib, soname", [("cublas", "libcublas.so.13"), ("cusolver", "libcusolver.so.12")])
@emulator_only
def test_analyze_without_cublas_or_cusolver_fails_in_one_line_and_writes_nothing(tmp_path, lib, soname):
    """A GPU machine without the math libraries: the emulator's build can hide them (on a real GPU the
    switch does nothing, so the test runs only there)."""
    import os
    import subprocess
    import sys
    pysafe.make_pair(tmp_path / "pair", preset="tiny")
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-P", "-c", "from pysafe.cli import main; main(prog_name='pysafe')",
                        "analyze", str(tmp_path / "pair" / "base"), str(tmp_path / "pair" / "tuned"), "--out",
                        str(out), "--device", "cuda", "--no-plots"],
                       env=dict(os.environ, PYSAFE_CUDA_EMU_HIDE=lib), capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: ") and f"needs {'cuBLAS' if lib == 'cublas' else 'cuSOLVER'}" in lines[0]
    assert soname in lines[0] and not out.exists()


@pytest.mark.cuda
@emulator_only
def test_emulated_device_memory_is_not_host_memory():
    """On the emulator, as on a GPU, host code that dereferences a device address crashes (so the engine's
    host code cannot pass the emulated tests by reading GPU memory directly)."""
    import subprocess
    import sys
    code = ("import ctypes, numpy as np\nfrom pysafe import _core\n"
            "a = _core.backend.device_array(0, np.ones((4, 4), np.float32))\n"
            "print(ctypes.c_float.from_address(a.__cuda_array_interface__['data'][0]).value)")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -11 and not r.stdout, (r.returncode, r.stdout, r.stderr[-500:])


def test_build_info_reports_cuda():
    info = pysafe.build_info()
    assert isinstance(info["cuda"], bool) and info["cuda_devices"] == _core.cuda_device_count()
    if info["cuda"]:
        assert info["cuda_runtime"] > 0 and len(info["cuda_device_names"]) == info["cuda_devices"]
        assert info["cuda_stage_bytes"] >= 1 << 20 and isinstance(info["cuda_emulator"], bool)


# ---- staging plan ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, chunk, align", [(0, 64, 2), (10, 64, 2), (64, 64, 2), (1000, 64, 4),
                                                  (1002, 64, 6), (12, 5, 4), (7, 1, 1)])
def test_staging_plan_covers_in_whole_elements_and_alternates(nbytes, chunk, align):
    plan = _core.backend.staging_plan(nbytes, chunk, align)
    pos = 0
    for i, (off, n, slot) in enumerate(plan):
        assert off == pos and n > 0 and n % align == 0 and n <= max(chunk - chunk % align, align)
        assert slot == i % 2
        pos += n
    assert pos == nbytes
    assert len(plan) == -(-nbytes // max(chunk // align * align, align))


def test_staging_plan_refuses_partial_elements():
    with pytest.raises(pysafe.CheckpointError, match="whole elements"):
        _core.backend.staging_plan(10, 64, 4)


# ---- primitives against float64 references, per device ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm(device, dtype, ta, tb):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((37, 53)).astype(dtype)
    B = rng.standard_normal((53, 29) if not tb else (29, 53)).astype(dtype)
    A = np.ascontiguousarray(A.T) if ta else A
    C = _core.backend.gemm(device, A, B, ta, tb)
    ref = (A.astype(np.float64).T if ta else A.astype(np.float64)) @ (B.astype(np.float64).T if tb else B)
    assert C.dtype == dtype and rel(C, ref) < 10 * tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("full", [True, False])
def test_orthonormalize(device, dtype, full):
    rng = np.random.default_rng(2)
    A = (rng.standard_normal((300, 20)) @ np.diag(np.logspace(0, -3, 20))).astype(dtype)
    Q, path = _core.backend.orthonormalize(device, A, full)
    Qd = Q.astype(np.float64)
    Ad = A.astype(np.float64)
    if full:
        assert np.linalg.norm(Qd.T @ Qd - np.eye(20)) < 100 * tol(dtype)
    else:  # a well-conditioned basis
        assert np.linalg.cond(Qd) < 1.5
    # the same column space: A's projection onto span(Q) is A (relative to the smallest direction kept)
    P = Qd @ np.linalg.lstsq(Qd, Ad, rcond=None)[0]
    assert np.linalg.norm(P - Ad) / np.linalg.norm(Ad) < 100 * tol(dtype)
    assert path in ("cholqr1", "cholqr2", "cholqr3", "householder")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("columns", [True, False])
def test_gram_f64(device, dtype, columns):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((70, 40)).astype(dtype)
    G = _core.backend.gram_f64(device, A, columns)
    Ad = A.astype(np.float64)
    ref = Ad.T @ Ad if columns else Ad @ Ad.T
    iu = np.triu_indices(ref.shape[0])
    assert np.allclose(G[iu], ref[iu], rtol=1e-13, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_reductions_and_conversions(device, dtype):
    rng = np.random.default_rng(4)
    R = rng.standard_normal((1000, 7)).astype(dtype)
    U = rng.standard_normal((1000, 7)).astype(dtype)
    theta = list(rng.uniform(0.5, 2, 7))
    n = _core.backend.col_norms(device, R)
    assert np.allclose(n, np.linalg.norm(R.astype(np.float64), axis=0), rtol=1e-13)
    r = _core.backend.residual_sumsq(device, R, U, theta)
    ref = ((R.astype(np.float64) - np.asarray(theta) * U.astype(np.float64)) ** 2).sum(axis=0)
    assert np.allclose(r, ref, rtol=1e-13)
    W = _core.backend.to_f64(device, R)
    assert W.dtype == np.float64 and np.array_equal(W, R.astype(np.float64))
    X = rng.standard_normal((50, 7))
    N = _core.backend.from_f64_div(device, X, theta, dtype == np.float64)
    assert N.dtype == dtype and np.array_equal(N, (X / np.asarray(theta)).astype(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("f64", [False, True])
@pytest.mark.parametrize("tdt, bdt", [("BF16", "BF16"), ("F16", "BF16"), ("F32", "F16"), ("F64", "F32")])
@pytest.mark.parametrize("from_host", [False, True], ids=["device_bytes", "host_bytes"])
def test_fused_delta_against_torch_upcast(device, f64, tdt, bdt, from_host):
    torch = pytest.importorskip("torch")
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4099, generator=g).to(names[bdt])
    tuned = (base.double() + 1e-3 * torch.randn(4099, generator=g, dtype=torch.float64)).to(names[tdt])
    raw = lambda t: t.contiguous().view(torch.uint8).numpy().tobytes()  # noqa: E731
    want = torch.float64 if f64 else torch.float32
    delta, b, st = _core.backend.fused_delta(device, raw(tuned), tdt, raw(base), bdt, f64, from_host)
    ref = (tuned.to(want) - base.to(want)).numpy()
    assert np.array_equal(delta, ref) and np.array_equal(b, base.to(want).numpy())
    assert st["nonfinite_tuned"] == st["nonfinite_base"] == 0
    assert st["sumsq_base"] == pytest.approx(float((base.double().numpy() ** 2).sum()), rel=1e-12)
    assert st["sumsq_delta"] == pytest.approx(float((ref.astype(np.float64) ** 2).sum()), rel=1e-12)
    tuned[7] = float("inf")
    base[11] = float("nan")
    delta, b, st = _core.backend.fused_delta(device, raw(tuned), tdt, raw(base), bdt, f64, from_host)
    assert np.array_equal(delta, (tuned.to(want) - base.to(want)).numpy(), equal_nan=True)
    assert st["nonfinite_tuned"] == 1 and st["nonfinite_base"] == 1
    assert not np.isfinite(st["sumsq_delta"])  # the caller skips such a tensor


@pytest.mark.cuda
@pytest.mark.parametrize("tdt, bdt", [("BF16", "BF16"), ("F32", "BF16")])
def test_upload_delta_across_staging_chunks_on_gpu(tdt, bdt):
    """Host bytes larger than one staging buffer (32 MiB; 1 MiB in the emulator's build): several chunks
    on alternating streams, each upcast where it lands; every element, the non-finite counts and the
    sums against torch in float64."""
    torch = pytest.importorskip("torch")
    names = {"BF16": torch.bfloat16, "F32": torch.float32}
    stage = _core.build_info()["cuda_stage_bytes"]
    per = (2 if tdt == "BF16" else 4) + 2
    n = 7 * stage // (2 * per) + 3  # 3.5 chunks, not a multiple of any: a short last chunk
    g = torch.Generator().manual_seed(8)
    base = torch.randn(n, generator=g).to(names[bdt])
    tuned = (base.float() + 1e-2 * torch.randn(n, generator=g)).to(names[tdt])
    assert len(_core.backend.staging_plan(n * per, stage, per)) == 4
    for i in (5, n // 2 + 1, n - 1):  # one non-finite value in the first, a middle and the last chunk
        tuned[i] = float("inf")
    base[n // 3] = float("nan")
    raw = lambda t: t.contiguous().view(torch.uint8).numpy().tobytes()  # noqa: E731
    delta, b, st = _core.backend.fused_delta(0, raw(tuned), tdt, raw(base), bdt, False, True)
    ref = (tuned.float() - base.float()).numpy()
    assert np.array_equal(delta, ref, equal_nan=True) and np.array_equal(b, base.float().numpy(), equal_nan=True)
    assert st["nonfinite_tuned"] == 3 and st["nonfinite_base"] == 1
    ok = np.isfinite(ref)
    tuned[~torch.from_numpy(ok)] = 0
    base[~torch.from_numpy(ok)] = 0
    delta, b, st = _core.backend.fused_delta(0, raw(tuned), tdt, raw(base), bdt, False, True)
    assert st["nonfinite_tuned"] == st["nonfinite_base"] == 0
    assert st["sumsq_base"] == pytest.approx(float((base.double().numpy() ** 2).sum()), rel=1e-9)
    ref = (tuned.double() - base.double()).numpy()  # the upcast to float32 is exact for these dtypes
    assert st["sumsq_delta"] == pytest.approx(float((ref ** 2).sum()), rel=1e-6)


@pytest.mark.cuda
def test_upload_delta_refuses_dtypes_the_gpu_does_not_upcast():
    with pytest.raises(ValueError, match="does not upcast"):
        _core.backend.fused_delta(0, bytes(8), "I32", bytes(8), "I32", False, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_epilogue_against_cdist_and_marks_cancellation(device, dtype):
    scipy = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(6)
    A = rng.standard_normal((40, 16))
    B = rng.standard_normal((30, 16))
    B[3] = A[5] + 1e-7  # a near duplicate: the Gram identity cancels there
    Ad, Bd = A.astype(dtype), B.astype(dtype)
    G = (Ad @ Bd.T).astype(dtype)
    sa, sb = (Ad.astype(np.float64) ** 2).sum(1), (Bd.astype(np.float64) ** 2).sum(1)
    u = np.finfo(dtype).eps / 2
    ca = 2 * np.sqrt(16) * u / 1e-5 * np.sqrt(sa)
    D, marked = _core.backend.distance_epilogue(device, G, sa.astype(dtype), sb.astype(dtype), ca.astype(dtype),
                                                np.sqrt(sb).astype(dtype), True)
    ref = scipy.cdist(Ad.astype(np.float64), Bd.astype(np.float64))
    keep = D >= 0
    assert marked == int((~keep).sum()) and not keep[5, 3]
    assert np.allclose(D[keep], ref[keep], rtol=100 * tol(dtype) ** 0.5 if dtype == np.float32 else 1e-10)


# ---- the algorithms on a GPU against the CPU backend and float64 references -------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1500, 1300), (1300, 1500)])
def test_block_krylov_on_gpu_matches_cpu_and_float64(dtype, shape):
    rng = np.random.default_rng(7)
    m, n = shape
    A = (rng.standard_normal((m, 40)) @ rng.standard_normal((40, n)) + 0.01 * rng.standard_normal((m, n)))
    A = A.astype(dtype)
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:20]
    _, Sc, _, ic = pysafe.truncated_svd(A, rank=20, exact_max_dim=256)
    U, Sg, Vt, ig = pysafe.truncated_svd(A, rank=20, exact_max_dim=256, device="cuda")
    assert ic["method"] == ig["method"] == "block_krylov" and ig["tol_reached"]
    assert np.all(np.abs(Sg - ref) <= np.asarray(ig["err"]) + 1e-12 * ref[0])  # the bound holds on the GPU too
    assert np.allclose(Sg, Sc, rtol=2e-4)
    assert np.linalg.norm(U.T.astype(np.float64) @ U - np.eye(20)) < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_eig_on_gpu_matches_cpu(dtype):
    rng = np.random.default_rng(8)
    A = rng.standard_normal((1400, 1100)).astype(dtype)
    _, Sc, _, ic = pysafe.truncated_svd(A, energy=0.5, exact_max_dim=256)
    _, Sg, _, ig = pysafe.truncated_svd(A, energy=0.5, exact_max_dim=256, device="cuda")
    assert ig["method"] == ic["method"] == "gram_eig" and ig["k"] == ic["k"]
    ref = np.linalg.svd(A.astype(np.float64), compute_uv=False)
    assert np.allclose(ig["spectrum"], ref, rtol=0, atol=np.sqrt(ig["spectrum_err"]))
    assert np.allclose(Sg, Sc, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_pairwise_distances_on_gpu_match_cpu(dtype, metric):
    rng = np.random.default_rng(9)
    X = rng.standard_normal((700, 64)).astype(dtype) + 50  # a large common offset: many entries recomputed
    Y = rng.standard_normal((300, 64)).astype(dtype) + 50
    Y[0] = X[0]
    X[1] = 0
    for b in (Y, None):
        c = pysafe.pairwise_distances(X, b, metric=metric)
        g = pysafe.pairwise_distances(X, b, metric=metric, device="cuda")
        assert np.allclose(g, c, rtol=2e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
        if b is None:
            assert np.array_equal(g, g.T) and not np.diag(g).any()


@pytest.mark.cuda
def test_analyze_on_gpu_matches_cpu_records(tiny_llama_pair):
    base, tuned, planted = tiny_llama_pair
    kw = dict(rank=4, exact_max_dim=16, spectrum="none")
    c = pysafe.compare(base, tuned, **kw)
    g = pysafe.compare(base, tuned, device="cuda", **kw)
    assert g.device["name"] == "cuda:0" and g.device["peak_bytes"] > 0
    assert [r["name"] for r in g.records] == [r["name"] for r in c.records]
    for rc, rg in zip(c.records, g.records):
        where = rc["name"]
        for key in ("base_fro", "delta_fro", "delta_rel"):  # from the data, not the SVDs
            assert rg[key] == pytest.approx(rc[key], rel=1e-6), (where, key)
        if "sv_delta" not in rc:  # a 1-D tensor: norms only
            continue
        for key in ("sv_delta", "sv_base"):  # the accuracy contract: tol 1e-4 on each side
            assert np.allclose(rg[key], rc[key], rtol=2e-4, atol=0), (where, key)
        for key in ("rank_delta", "rank_base", "null_frac_left_chance", "overlap_right_chance"):
            assert np.array_equal(rg[key], rc[key], equal_nan=True), (where, key)
        # subspace metrics: the same seeds, so only rounding separates the two backends' subspaces
        for key in ("null_frac_left", "null_frac_right", "overlap_left", "overlap_right", "energy_topk_delta"):
            if rc[key] == rc[key]:
                assert rg[key] == pytest.approx(rc[key], abs=1e-3), (where, key)
    for name, d in planted.items():  # against float64: the planted rank-2 ΔW's singular values
        ref = np.linalg.svd(d, compute_uv=False)[:2]
        assert np.allclose(g.record(name)["sv_delta"][:2], ref, rtol=1e-4), name


@pytest.mark.cuda
def test_analyze_cli_on_gpu_reports_its_device_and_matches_cpu(tmp_path):
    import json

    from click.testing import CliRunner

    from pysafe.cli import main

    pysafe.make_pair(tmp_path / "pair", preset="tiny")
    runs = {}
    for device in ("cpu", "cuda"):
        r = CliRunner().invoke(main, ["analyze", str(tmp_path / "pair" / "base"), str(tmp_path / "pair" / "tuned"),
                                      "--out", str(tmp_path / device), "--device", device, "--no-plots", "--no-cache"])
        assert r.exit_code == 0, r.output
        assert ("engine on cuda:0: peak device memory" in r.stderr) == (device == "cuda")
        runs[device] = {t["name"]: t for t in json.loads((tmp_path / device / "summary.json").read_text())["matrices"]}
    assert runs["cpu"].keys() == runs["cuda"].keys()
    for name, rc in runs["cpu"].items():
        assert runs["cuda"][name]["delta_fro"] == pytest.approx(rc["delta_fro"], rel=1e-6), name
        if rc.get("sv_delta"):
            assert np.allclose(runs["cuda"][name]["sv_delta"], rc["sv_delta"], rtol=2e-4), name


@pytest.mark.cuda
@pytest.mark.parametrize("center", [False, True], ids=["formed_on_gpu", "centred_on_host"])
def test_analyze_bf16_on_gpu_matches_cpu_and_float64(tmp_path, center):
    """bf16 checkpoints: without centring ΔW and W_base are formed on the GPU from the raw bytes (the
    SVDs start there); with it, on the host. Either way the records agree with the CPU backend's, and
    ΔW's singular values with a float64 SVD of the upcast difference."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(3)
    base = {"layer.weight": torch.randn(600, 400, generator=g).to(torch.bfloat16),
            "norm.weight": torch.randn(400, generator=g).to(torch.bfloat16)}
    plant = torch.randn(600, 3, generator=g) @ torch.randn(3, 400, generator=g) * 0.05
    tuned = {"layer.weight": (base["layer.weight"].float() + plant).to(torch.bfloat16),
             "norm.weight": (base["norm.weight"].float() + 0.01).to(torch.bfloat16)}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        st.save_file(tensors, str(tmp_path / name / "model.safetensors"))
    kw = dict(rank=5, exact_max_dim=16, spectrum="none", center=center)
    c = pysafe.compare(tmp_path / "base", tmp_path / "tuned", **kw)
    gpu = pysafe.compare(tmp_path / "base", tmp_path / "tuned", device="cuda", **kw)
    assert gpu.device["name"] == "cuda:0" and gpu.device["peak_bytes"] >= 2 * 600 * 400 * 4
    for key in ("base_fro", "delta_fro", "delta_rel"):
        assert gpu.record("layer.weight")[key] == pytest.approx(c.record("layer.weight")[key], rel=1e-6), key
        assert gpu.record("norm.weight")[key] == pytest.approx(c.record("norm.weight")[key], rel=1e-6), key
    for key in ("sv_delta", "sv_base"):
        assert np.allclose(gpu.record("layer.weight")[key], c.record("layer.weight")[key], rtol=2e-4), key
    d = tuned["layer.weight"].double() - base["layer.weight"].double()
    if center:
        d = d - d.mean(0, keepdim=True)
    ref = np.linalg.svd(d.numpy(), compute_uv=False)[:3]
    assert np.allclose(gpu.record("layer.weight")["sv_delta"][:3], ref, rtol=1e-4)


# ---- distances on inputs already in the backend's memory ---------------------------------------------------

def _ref_distances(X, Y, metric, self=False):
    """float64 distances computed difference-first (no Gram identity): the independent reference (a zero
    row is at cosine distance 1 from every other row; self distances have a zero diagonal)."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    if metric == "cosine":
        nx, ny = np.linalg.norm(X, axis=1, keepdims=True), np.linalg.norm(Y, axis=1, keepdims=True)
        X, Y = X / np.where(nx > 0, nx, 1), Y / np.where(ny > 0, ny, 1)
        D = 0.5 * ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
        D[(nx[:, 0] == 0)[:, None] | (ny[:, 0] == 0)[None, :]] = 1.0
    else:
        D = np.sqrt(((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1))
    if self:
        np.fill_diagonal(D, 0.0)
    return D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_col_sums_and_prepare_rows_against_float64(device, dtype):
    rng = np.random.default_rng(12)
    P = (rng.standard_normal((300, 33)) * 3 + 20).astype(dtype)
    P[4] = 0
    P64 = P.astype(np.float64)
    assert np.allclose(_core.backend.col_sums(device, P), P64.sum(0), rtol=1e-13)
    mu = P64.mean(0)
    X, sq, inv = _core.backend.prepare_rows(device, P, False, list(mu))
    assert X.dtype == dtype and np.array_equal(X, (P64 - mu).astype(dtype)) and inv.size == 0
    assert np.allclose(sq, (X.astype(np.float64) ** 2).sum(1), rtol=1e-13)
    X, sq, inv = _core.backend.prepare_rows(device, P, True)
    norms = np.linalg.norm(P64, axis=1)
    assert inv[4] == 0 and np.allclose(inv[norms > 0], 1 / norms[norms > 0], rtol=1e-13)
    assert np.allclose(X, P64 * inv[:, None], rtol=2 * np.finfo(dtype).eps, atol=0) and not X[4].any()
    assert np.allclose(sq[norms > 0], 1.0, rtol=1e-6 if dtype == np.float32 else 1e-13) and sq[4] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_resident_distances_on_cpu_memory_match_float64(dtype, metric):
    """The resident path (preparation by the backend's primitives, rows fetched one at a time for the
    recomputed entries) run on the CPU backend, where host memory is the backend's memory."""
    rng = np.random.default_rng(13)
    X = np.ascontiguousarray(rng.standard_normal((150, 24)) + 50, dtype=dtype)  # large offset: recomputes
    Y = np.ascontiguousarray(rng.standard_normal((90, 24)) + 50, dtype=dtype)
    Y[0] = X[0]
    X[1] = 0
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    D, st = _core.pairwise_distances_resident(X.ctypes.data, 150, 24, Y.ctypes.data, 90, dtype == np.float64,
                                              metric, -1)
    assert np.allclose(D, _ref_distances(X, Y, metric), **tol)
    assert np.allclose(D, pysafe.pairwise_distances(X, Y, metric=metric), **tol)
    assert D[0, 0] == 0 and (metric == "cosine" or st["recomputed"] > 0)
    S, _ = _core.pairwise_distances_resident(X.ctypes.data, 150, 24, None, 0, dtype == np.float64, metric, -1)
    assert np.array_equal(S, S.T) and not np.diag(S).any()
    assert np.allclose(S, _ref_distances(X, X, metric, self=True), **tol)


def test_resident_distances_refuse_non_finite_values():
    X = np.ones((5, 3))
    X[2, 1] = np.inf
    for metric, where in (("euclidean", "in column 1"), ("cosine", "in row 2")):
        with pytest.raises(ValueError, match=f"non-finite value.*{where}"):
            _core.pairwise_distances_resident(X.ctypes.data, 5, 3, None, 0, True, metric, -1)


class _FakeCudaArray:
    """An object announcing a __cuda_array_interface__ (the address is a host one: nothing reads it)."""

    def __init__(self, a, strides=None, typestr=None):
        self._a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": typestr or a.dtype.str, "version": 3,
                                         "data": (a.ctypes.data, False), "strides": strides}


def test_gpu_inputs_are_recognised():
    from pysafe.distances import _on_gpu
    torch = pytest.importorskip("torch")

    class Dl:
        def __init__(self, kind):
            self.kind = kind

        def __dlpack__(self, stream=None):
            raise AssertionError("not read")

        def __dlpack_device__(self):
            return (self.kind, 0)

    assert _on_gpu(_FakeCudaArray(np.ones((2, 2)))) and _on_gpu(Dl(2))
    assert not _on_gpu(np.ones((2, 2))) and not _on_gpu(torch.ones(2, 2)) and not _on_gpu(Dl(1))


def test_gpu_inputs_go_to_the_resident_path_without_the_host(monkeypatch):
    """Dispatch on a machine without a GPU: the device check and the engine call are replaced by
    recorders; a __cuda_array_interface__ input must reach the resident entry point by address, and
    the host path (_as_matrix) must not be taken."""
    import pysafe.distances as dist
    calls = []
    monkeypatch.setattr(dist, "engine_device", lambda device: 0)
    monkeypatch.setattr(dist, "_as_matrix", lambda *a: pytest.fail("copied to the host"))
    monkeypatch.setattr(dist._core, "pairwise_distances_resident",
                        lambda *args: calls.append(args) or (np.zeros((args[1], args[4] or args[1])), {}))
    a = np.ones((4, 3), dtype=np.float32)
    b = np.ones((6, 3), dtype=np.float32)
    fa, fb = _FakeCudaArray(a), _FakeCudaArray(b)
    assert dist.pairwise_distances(fa, fb, metric="cosine", device="cuda").shape == (4, 6)
    assert calls[-1] == (a.ctypes.data, 4, 3, b.ctypes.data, 6, False, "cosine", 0)
    dist.pairwise_distances(fa, device="cuda")
    assert calls[-1] == (a.ctypes.data, 4, 3, None, 0, False, "euclidean", 0)
    with pytest.raises(TypeError, match="must be float32"):  # b is cast to a's precision only by torch
        dist.pairwise_distances(fa, _FakeCudaArray(b.astype(np.float64)), device="cuda")
    with pytest.raises(TypeError, match="float32 or float64"):
        dist.pairwise_distances(_FakeCudaArray(a.astype(np.int32)), device="cuda")
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.pairwise_distances(_FakeCudaArray(a, strides=(4, 16)), device="cuda")
    with pytest.raises(ValueError, match="2-D"):
        dist.pairwise_distances(_FakeCudaArray(np.ones(3, dtype=np.float32)), device="cuda")
    with pytest.raises(ValueError, match="a has 3 features, b has 2"):
        dist.pairwise_distances(fa, _FakeCudaArray(np.ones((2, 2), dtype=np.float32)), device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["torch", "cuda_array_interface"])
def test_pairwise_distances_on_gpu_inputs_in_place(kind, dtype, metric, monkeypatch):
    """Inputs already in GPU memory, as CUDA torch tensors or announced by __cuda_array_interface__ (as
    CuPy and Numba arrays are): used where they are (never copied to the host), against float64 and the
    CPU path."""
    torch = pytest.importorskip("torch")
    if kind == "torch" and not torch.cuda.is_available():  # the CUDA emulator's build: torch has no GPU there
        pytest.skip("torch has no CUDA device")
    import pysafe.distances as dist
    rng = np.random.default_rng(14)
    X = rng.standard_normal((700, 64)).astype(dtype) + 50  # a large offset: entries recomputed
    Y = rng.standard_normal((300, 64)).astype(dtype) + 50
    Y[0] = X[0]
    X[1] = 0
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    c = pysafe.pairwise_distances(X, Y, metric=metric)
    if kind == "torch":
        Xg, Yg = torch.from_numpy(X).cuda(), torch.from_numpy(Y).cuda()
    else:
        Xg, Yg = _core.backend.device_array(0, X), _core.backend.device_array(0, Y)
        assert Xg.__cuda_array_interface__["shape"] == (700, 64)
    monkeypatch.setattr(dist, "_as_matrix", lambda *a: pytest.fail("copied to the host"))
    g = pysafe.pairwise_distances(Xg, Yg, metric=metric, device="cuda")
    assert np.allclose(g, c, **tol) and np.allclose(g, _ref_distances(X, Y, metric), **tol)
    s = pysafe.pairwise_distances(Xg, metric=metric, device="cuda")
    assert np.array_equal(s, s.T) and not np.diag(s).any() and np.allclose(s, _ref_distances(X, X, metric, self=True), **tol)
    if kind == "torch":
        m = pysafe.pairwise_distances(Xg, Y, metric=metric, device="cuda")  # a host b joins a on the GPU
        assert np.allclose(m, g, **tol)
        t = pysafe.pairwise_distances(Xg.T.contiguous().T, Yg, metric=metric, device="cuda")  # made contiguous there
        assert np.allclose(t, g, **tol)


@pytest.mark.cuda
def test_resident_distances_refuse_host_memory_on_a_gpu():
    X = np.ones((5, 3))
    with pytest.raises(ValueError, match="a is not in GPU memory but the distances run on cuda:0"):
        _core.pairwise_distances_resident(X.ctypes.data, 5, 3, None, 0, True, "euclidean", 0)

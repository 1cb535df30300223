"""Can the emulated GPU's tests fail? Plants one bug at a time in csrc/backend/cuda_backend.cu (a missing
synchronisation, a wrong leading dimension, a racing reduction, ...), builds the emulator's variant of
pysafe with it, and runs the ``cuda`` tests against it: each mutant must make at least one test fail.
A mutant that passes is a bug class the emulator (or the tests) cannot see. Not part of the test suite
(a build per mutant: about half a minute each on 2 cores); the results are in docs/gpu.md.

    python tests/emulator_mutants.py [--only NAME ...] [--runs N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "csrc/backend/cuda_backend.cu"

# name -> (what the bug is, the text replaced, its replacement); each text must occur exactly once
MUTANTS = {
    "no_wait_for_zeroing": (
        "the copy streams start before the outputs and counters are zero-filled on the main stream",
        "for (int s = 0; s < 2; ++s) check_cuda(cudaStreamWaitEvent(copy_[s], ready_, 0), \"cudaStreamWaitEvent\");",
        ""),
    "pinned_buffer_reused_early": (
        "a pinned staging buffer is refilled before its previous chunk has left it",
        "check_cuda(cudaEventSynchronize(done_[c.slot]), \"cudaEventSynchronize\");  // the pinned buffer is free",
        ""),
    "upload_without_waiting": (
        "upload() writes a buffer before the work queued on the main stream (its zero-filling) is done",
        "check_cuda(cudaStreamSynchronize(stream_), \"cudaStreamSynchronize\");  // dst may still be in use",
        ""),
    "upload_returns_early": (
        "upload() returns before its copies have arrived",
        "for (int s = 0; s < 2; ++s) check_cuda(cudaStreamSynchronize(copy_[s]), \"cudaStreamSynchronize\");\n  }\n"
        "  void download(",
        "}\n  void download("),
    "reduction_race": (
        "block_sum's first barrier is gone: a second reduction overwrites the shared array while the first "
        "one's result is still being read",
        "  __syncthreads();  // the previous call's readers are done with sh\n",
        ""),
    "chunk_offset": (
        "every chunk's upcast writes at the start of the output",
        "base_out ? base_out + first : nullptr, delta + first,",
        "base_out ? base_out : nullptr, delta,"),
    "gemm_swapped_ld": (
        "row-major to column-major GEMM with the two leading dimensions swapped",
        "to_int(K), &alpha, B, to_int(ldb), A, to_int(lda), &beta, C, to_int(ldc)),",
        "to_int(K), &alpha, B, to_int(lda), A, to_int(ldb), &beta, C, to_int(ldc)),"),
    "gram_fill_mode": (
        "the Gram matrix's SYRK fills the other triangle than the one the host reads",
        "cublasDsyrk_v2(blas_, CUBLAS_FILL_MODE_LOWER,",
        "cublasDsyrk_v2(blas_, CUBLAS_FILL_MODE_UPPER,"),
    "qr_transpose_back": (
        "orthonormalisation copies the Householder basis back without transposing it",
        "geam(in, im, X.data(), im, A, in);  // A (col-major n×m) = Xᵀ",
        "check_cuda(cudaMemcpyAsync(A, X.data(), sizeof(T) * m * n, cudaMemcpyDeviceToDevice, stream_), \"copy\");"),
    "epilogue_column_index": (
        "the distance epilogue pairs entry i with the wrong column vector",
        "const int64_t r = i / cols, q = i % cols;\n    const T s2",
        "const int64_t r = i / cols, q = r % cols;\n    const T s2"),
    "residual_slices": (
        "the column reductions' row slices overlap (each slice starts at row 0)",
        "for (int64_t r = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;\n"
        "       r += static_cast<int64_t>(gridDim.y) * blockDim.x) {\n    double v",
        "for (int64_t r = threadIdx.x; r < rows;\n"
        "       r += static_cast<int64_t>(gridDim.y) * blockDim.x) {\n    double v"),
    "host_pointer_to_kernel": (
        "a kernel is handed the host vector of θ instead of its device copy",
        "X, U, th.data(), rows,",
        "X, U, theta.data(), rows,"),
    "host_reads_device_memory": (
        "the fused kernel's counters are read straight from device memory by the host, not downloaded",
        "const auto c = counters.to_host();",
        "const std::vector<unsigned long long> c(counters.data(), counters.data() + 2);"),
    "download_unsynchronised": (
        "download() reads the pinned buffer before the copy into it has finished",
        "                 \"cudaMemcpyAsync (device to host)\");\n"
        "      check_cuda(cudaStreamSynchronize(stream_), \"cudaStreamSynchronize\");",
        "                 \"cudaMemcpyAsync (device to host)\");"),
}

# Bugs the emulator cannot see, run to show that they pass (its blind spots, named in docs/gpu.md)
BLIND_SPOTS = {
    "non_atomic_block_sum": (
        "blocks add their partial sums to the result without an atomic: a race between blocks running at "
        "once on a GPU; the emulator runs the blocks of a kernel one after another",
        "if (threadIdx.x == 0) atomicAdd(out, sh[0]);",
        "if (threadIdx.x == 0) *out += sh[0];"),
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutant names (default: all)")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--runs", type=int, default=1, help="test runs per mutant (the races are caught by chance)")
    args = ap.parse_args()
    known = {**MUTANTS, **BLIND_SPOTS}
    names = args.only or list(known)
    original = (ROOT / SOURCE).read_text(encoding="utf-8")
    for name in names:
        _, old, _ = known[name]
        if original.count(old) != 1:
            sys.exit(f"{name}: its text occurs {original.count(old)} times in {SOURCE}, not once")
    work = Path(args.keep or tempfile.mkdtemp(prefix="pysafe-mutants-"))
    src, build, site = work / "src", work / "build", work / "site"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.so", "__pycache__", ".whl"))
    import pybind11  # the build's own requirements, from this environment
    import scipy_openblas32  # noqa: F401
    run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
         "-DSKBUILD_PROJECT_VERSION=0.1.0", "-DPYSAFE_CUDA_EMULATOR=ON"])
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(src / "pysafe", site / "pysafe")
    ext = "_core" + sysconfig.get_config_var("EXT_SUFFIX")
    env = dict(os.environ, PYTHONPATH=str(site))
    survivors = []
    for name in ["(none)"] + names:
        _, old, new = known.get(name, ("the backend as it is", "", ""))
        (src / SOURCE).write_text(original.replace(old, new, 1) if old else original, encoding="utf-8")
        run(["cmake", "--build", str(build)])
        shutil.copy2(build / ext, site / "pysafe" / ext)
        caught, first = 0, set()
        for _ in range(args.runs):  # the races are caught by chance: how often?
            r = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                "-x", str(src / "tests" / "test_backend.py")],
                               env=env, text=True, capture_output=True, cwd=work, timeout=900)
            caught += r.returncode != 0
            first.update(ln.split(" ")[1].split("::")[-1] for ln in r.stdout.splitlines() if ln.startswith("FAILED "))
        print(f"{name:28s} caught in {caught} of {args.runs} runs  {sorted(first)}", flush=True)
        if name == "(none)" and caught:
            sys.exit("the unmutated backend fails its emulated tests: fix that first\n" + r.stdout[-3000:])
        if name != "(none)" and caught < args.runs and name not in BLIND_SPOTS:
            survivors.append(name)
    (src / SOURCE).write_text(original, encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    blind = [n for n in names if n in BLIND_SPOTS]
    names = [n for n in names if n not in BLIND_SPOTS]
    if blind:
        print(f"blind spots (expected to pass): {', '.join(blind)}")
    print(f"\n{len(names) - len(survivors)} of {len(names)} mutants caught in every run" +
          (f"; not always: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

"""How much faster than ``torch.svd_lowrank(niter=4)`` can a fixed-rank SVD get on this machine?

Issue 12's target (a) asks for 2x at equal or better top-k accuracy. This script measures the two leads that
were left, in isolation, with torch's own GEMMs (MKL), so that their ceiling is known before any engine work:

  --what products   the cost of one skinny product A·X and Aᵀ·Y with one big A (the operation every
                    randomized SVD repeats): torch.mm (MKL, packs A in every call), NumPy (OpenBLAS), and
                    MKL's packed GEMM (``cblas_sgemm_pack`` once, then ``cblas_sgemm_compute``; the symbols
                    torch's CPU build exports), with the cost of packing A into a warm buffer;
  --what krylov     the cheapest *uncertified* randomized block Krylov (Musco & Musco: depth d, block
                    k + p = 74, QR of the basis, B = QᵀA, values of B) against ``svd_lowrank(q=74, niter=4)``
                    on one W_base of each shape of a pair written by ``pysafe make-pair``: time (best of --repeat)
                    and the top-64 singular values' max relative error against a float64 SVD;
  --what spectrum   target (b)'s whole-spectrum number, the effective rank exp H(σ²/Σσ²) of one ΔW of the pair:
                    modeldelta's call (float32 ``svdvals``) against stochastic Lanczos quadrature (Hutchinson
                    probes, Lanczos on ΔWᵀΔW), plain and deflated by the top 20 (found by
                    ``svd_lowrank(q=30, niter=4)``, timed in), with its 95% error bar.

    python bench/lowrank_ceiling.py --what products --threads 1
    python bench/lowrank_ceiling.py --what krylov --base /work/benchout/peers-medium/base --threads 2
    python bench/lowrank_ceiling.py --what spectrum --base DIR/base --tuned DIR/tuned --threads 2

One JSON line per measurement on stdout. Nothing here is timed in a test.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import sys
import time


def _threads_from_argv() -> str:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


if __name__ == "__main__":  # NumPy's OpenBLAS reads its thread count at import: give it torch's
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads_from_argv()

import torch  # noqa: E402  (after the thread variables: torch loads NumPy's OpenBLAS)

ROW, NOTRANS, TRANS, PACKED, A_MATRIX = 101, 111, 112, 151, 161  # CBLAS / MKL enum values


def _mkl():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    size = lib.cblas_sgemm_pack_get_size
    size.restype, size.argtypes = ctypes.c_size_t, [ctypes.c_int] * 4
    pack = lib.cblas_sgemm_pack
    pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    comp = lib.cblas_sgemm_compute
    comp.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                          ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return size, pack, comp


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class PackedA:
    """MKL's packed form of one A (m × n), for A·X and Aᵀ·Y with X, Y of ``width`` columns."""

    def __init__(self, A: torch.Tensor, width: int):
        self.size, self.pack, self.comp = _mkl()
        self.A, self.b = A.contiguous(), width
        m, n = A.shape
        self.P1 = torch.zeros(self.size(A_MATRIX, m, width, n) // 4 + 16)  # op(A) = A   (m x n)
        self.P2 = torch.zeros(self.size(A_MATRIX, n, width, m) // 4 + 16)  # op(A) = Aᵀ  (n x m)
        self.C1, self.C2 = torch.empty(m, width), torch.empty(n, width)
        self.repack()

    def repack(self) -> None:
        m, n = self.A.shape
        self.pack(ROW, A_MATRIX, NOTRANS, m, self.b, n, 1.0, self.A.data_ptr(), n, self.P1.data_ptr())
        self.pack(ROW, A_MATRIX, TRANS, n, self.b, m, 1.0, self.A.data_ptr(), n, self.P2.data_ptr())

    def products(self, X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A·X, Aᵀ·Y) into this object's buffers."""
        m, n = self.A.shape
        if X.shape != (n, self.b) or Y.shape != (m, self.b) or not (X.is_contiguous() and Y.is_contiguous()):
            raise ValueError(f"X must be ({n}, {self.b}) and Y ({m}, {self.b}), contiguous float32")
        self.comp(ROW, PACKED, NOTRANS, m, self.b, n, self.P1.data_ptr(), n, X.data_ptr(), self.b, 0.0,
                  self.C1.data_ptr(), self.b)
        self.comp(ROW, PACKED, NOTRANS, n, self.b, m, self.P2.data_ptr(), m, Y.data_ptr(), self.b, 0.0,
                  self.C2.data_ptr(), self.b)
        return self.C1, self.C2


def products(shapes, widths, reps: int) -> None:
    for m, n in shapes:
        A = torch.randn(m, n)
        An = A.numpy()
        for b in widths:
            X, Y = torch.randn(n, b), torch.randn(m, b)
            Xn, Yn = X.numpy(), Y.numpy()
            t_torch = _best(lambda: (torch.mm(A, X), torch.mm(A.t(), Y)), reps) / 2
            t_numpy = _best(lambda: (An @ Xn, An.T @ Yn), reps) / 2
            pa = PackedA(A, b)
            t_pack = _best(pa.repack, reps)
            t_packed = _best(lambda: pa.products(X, Y), reps) / 2
            C1, C2 = pa.products(X, Y)
            ref1, ref2 = A.double() @ X.double(), A.double().t() @ Y.double()
            err = max(((C1.double() - ref1).abs().max() / ref1.abs().max()).item(),
                      ((C2.double() - ref2).abs().max() / ref2.abs().max()).item())
            gf = 2 * m * n * b / 1e9
            print(json.dumps({"what": "products", "m": m, "n": n, "width": b, "threads": torch.get_num_threads(),
                              "torch_mm_ms": round(t_torch * 1e3, 2), "numpy_ms": round(t_numpy * 1e3, 2),
                              "mkl_packed_ms": round(t_packed * 1e3, 2),
                              "pack_A_and_At_ms": round(t_pack * 1e3, 2),
                              "gflops": {"torch_mm": round(gf / t_torch, 1), "numpy": round(gf / t_numpy, 1),
                                         "mkl_packed": round(gf / t_packed, 1)},
                              "packed_speedup_vs_torch": round(t_torch / t_packed, 3),
                              "pack_cost_in_products": round(t_pack / t_torch, 2),
                              "packed_rel_err": float(f"{err:.2e}")}), flush=True)


def block_krylov_values(A: torch.Tensor, k: int, b: int, depth: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Y = A @ torch.randn(A.shape[1], b, generator=g)
    blocks = [Y]
    for _ in range(depth):
        Y, _ = torch.linalg.qr(A @ (A.t() @ Y))
        blocks.append(Y)
    Q, _ = torch.linalg.qr(torch.cat(blocks, 1))
    return torch.linalg.svdvals(Q.t() @ A)[:k]


def krylov(base: str, k: int, p: int, depths, reps: int) -> None:
    from safetensors import safe_open

    shapes: dict = {}
    for f in sorted(glob.glob(os.path.join(base, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                s = tuple(h.get_slice(name).get_shape())
                if len(s) == 2:
                    shapes.setdefault(s, (f, name))
    torch.svd_lowrank(torch.randn(256, 256), q=16, niter=1)  # warm-up
    for shape, (f, name) in shapes.items():
        with safe_open(f, "pt") as h:
            A = h.get_tensor(name).float()
        exact = torch.linalg.svdvals(A.double())[:k]

        def err(s):
            return float(((s[:k].double() - exact).abs() / exact).max())

        t_torch = _best(lambda: torch.svd_lowrank(A, q=k + p, niter=4), reps)
        e_torch = err(torch.svd_lowrank(A, q=k + p, niter=4)[1])
        row = {"what": "krylov", "tensor": name, "shape": list(shape), "threads": torch.get_num_threads(),
               "svd_lowrank_niter4": {"ms": round(t_torch * 1e3, 1), "max_rel_err": float(f"{e_torch:.2e}")}}
        for d in depths:
            t = _best(lambda: block_krylov_values(A, k, k + p, d), reps)
            row[f"block_krylov_depth{d}"] = {"ms": round(t * 1e3, 1),
                                             "max_rel_err": float(f"{err(block_krylov_values(A, k, k + p, d)):.2e}"),
                                             "speed_vs_torch": round(t_torch / t, 3)}
        print(json.dumps(row), flush=True)


def slq_effective_rank(D: torch.Tensor, probes: int, steps: int, deflate: int = 0, seed: int = 0):
    """exp H(σ²/Σσ²) of D by stochastic Lanczos quadrature: H = log S − tr f(DᵀD) / S with f(λ) = λ log λ and
    S = ‖D‖_F² (exact). With ``deflate`` = k, the top k singular pairs (``svd_lowrank``) enter exactly and
    the quadrature runs on the rest. Returns (estimate, half-width of its 95% interval over probes)."""
    g = torch.Generator().manual_seed(seed)
    n = D.shape[1]
    S = float((D.double() ** 2).sum())
    exact_part, V = 0.0, None
    if deflate:
        _, sv, V = torch.svd_lowrank(D, q=deflate + 10, niter=4)
        sv, V = sv[:deflate].double(), V[:, :deflate].contiguous()
        exact_part = float((sv ** 2 * torch.log(sv ** 2)).sum())

    def project(X):
        return X if V is None else X - V @ (V.t() @ X)

    Z = project(torch.randint(0, 2, (n, probes), generator=g).float() * 2 - 1)
    Q = Z / Z.norm(dim=0)
    basis, alphas, betas = [Q], [], []
    Q_prev, beta = torch.zeros_like(Q), torch.zeros(probes)
    for _ in range(steps):
        W = project(D.t() @ (D @ Q))
        a = (W * Q).sum(0)
        W = W - a * Q - beta * Q_prev
        for Qo in basis:  # full reorthogonalisation, per probe
            W = W - (W * Qo).sum(0) * Qo
        beta = W.norm(dim=0).clamp_min(1e-30)
        alphas.append(a)
        betas.append(beta)
        Q_prev, Q = Q, W / beta
        basis.append(Q)
    al, be = torch.stack(alphas, 1).double(), torch.stack(betas[:-1], 1).double()
    scale = (Z.double().norm(dim=0) ** 2)  # z'f(M)z = ‖z‖² e1' f(T) e1
    vals = []
    for i in range(probes):
        T = torch.diag(al[i]) + torch.diag(be[i], 1) + torch.diag(be[i], -1)
        th, U = torch.linalg.eigh(T)
        th = th.clamp_min(1e-300)
        vals.append(scale[i] * (U[0] ** 2 * th * th.log()).sum())
    vals = torch.stack(vals)
    trace = exact_part + float(vals.mean())
    half = 1.96 * float(vals.std()) / probes ** 0.5
    est = math.exp(math.log(S) - trace / S)
    return est, est * half / S


def spectrum(base: str, tuned: str, name: str | None, reps: int) -> None:
    from safetensors import safe_open

    def load(folder, want):
        for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    if (want is None and len(h.get_slice(k).get_shape()) == 2 and "mlp" in k) or k == want:
                        return k, h.get_tensor(k).float()
        raise SystemExit(f"no tensor {want or '(an MLP matrix)'} in {folder}")

    name, B = load(base, name)
    _, T = load(tuned, name)
    D = (T - B).contiguous()
    del B, T
    lam = torch.linalg.svdvals(D.double()) ** 2
    p = lam / lam.sum()
    exact = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
    t_md = _best(lambda: torch.linalg.svdvals(D), reps)
    s = torch.linalg.svdvals(D).double() ** 2
    q = s / s.sum()
    row = {"what": "spectrum", "tensor": name, "shape": list(D.shape), "threads": torch.get_num_threads(),
           "effective_rank_exact": round(exact, 3),
           "svdvals_f32": {"s": round(t_md, 3), "effective_rank": round(math.exp(float(-(q[q > 0] * q[q > 0].log()).sum())), 3)}}
    for deflate, probes, steps in ((0, 8, 20), (0, 32, 30), (20, 8, 20), (20, 32, 30)):
        t = _best(lambda: slq_effective_rank(D, probes, steps, deflate), reps)
        est, half = slq_effective_rank(D, probes, steps, deflate)
        row[f"slq_deflate{deflate}_p{probes}_m{steps}"] = {
            "s": round(t, 3), "effective_rank": round(est, 3), "ci95_half_width": round(half, 3),
            "rel_err": float(f"{abs(est - exact) / exact:.2e}"), "speed_vs_svdvals": round(t_md / t, 2)}
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["products", "krylov", "spectrum"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--base", help="folder of W_base's .safetensors (--what krylov)")
    ap.add_argument("--tuned", help="folder of the tuned side's .safetensors (--what spectrum)")
    ap.add_argument("--tensor", help="the ΔW to use (--what spectrum; default: the first MLP matrix)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--oversample", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "products":
        products([(2048, 2048), (5504, 2048), (11008, 4096)], [18, 74], a.repeat)
    elif a.what == "krylov":
        if not a.base:
            ap.error("--what krylov needs --base")
        krylov(a.base, a.rank, a.oversample, (1, 2, 3), a.repeat)
    else:
        if not (a.base and a.tuned):
            ap.error("--what spectrum needs --base and --tuned")
        spectrum(a.base, a.tuned, a.tensor, a.repeat)


if __name__ == "__main__":
    main()

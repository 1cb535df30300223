"""The whole spectrum of one matrix, three ways: what a faster exact path for the spectrum-wide metrics
(effective rank, energy ranks) could gain over `torch.linalg.svdvals` (what modeldelta runs per matrix).

    python bench/bench_spectrum.py [--m 5504 --n 2048]

Times (best of 2, torch's default threads) the float32 Gram matrix AᵀA + LAPACK `syevd` (values only), the
same in float64 (what the engine's `gram_eig` does today), and `torch.linalg.svdvals` in float32; accuracy is
max |λ̂_i − λ_i| / λ_1 of each against the float64 Gram eigenvalues.
"""

import argparse
import time

import numpy as np
import scipy.linalg as sl
import torch


def best_of(f, reps=2):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=5504)
    ap.add_argument("--n", type=int, default=2048)
    a = ap.parse_args()
    A = np.random.default_rng(0).standard_normal((a.m, a.n)).astype(np.float32)
    A64 = A.astype(np.float64)
    tg32, G32 = best_of(lambda: A.T @ A)
    te32, w32 = best_of(lambda: sl.eigvalsh(G32, driver="evd"))
    tg64, G64 = best_of(lambda: A64.T @ A64)
    te64, w64 = best_of(lambda: sl.eigvalsh(G64, driver="evd"))
    ts, s = best_of(lambda: torch.linalg.svdvals(torch.from_numpy(A)))
    ref = np.sort(w64)[::-1]
    err = lambda lam: float(np.max(np.abs(np.sort(np.asarray(lam, dtype=np.float64))[::-1] - ref)) / ref[0])
    print(f"{a.m}x{a.n} float32, torch threads {torch.get_num_threads()}")
    print(f"float32 Gram + syevd: {tg32:.2f} + {te32:.2f} = {tg32 + te32:.2f} s, error {err(w32):.1e}")
    print(f"float64 Gram + syevd: {tg64:.2f} + {te64:.2f} = {tg64 + te64:.2f} s")
    print(f"torch.linalg.svdvals: {ts:.2f} s, error {err(s.double().numpy() ** 2):.1e}")
    print(f"svdvals / float32 Gram path: {ts / (tg32 + te32):.2f}x; svdvals / float64 Gram path: {ts / (tg64 + te64):.2f}x")


if __name__ == "__main__":
    main()

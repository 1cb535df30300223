"""bench/lowrank_ceiling.py's two building blocks, against independent references (no timing here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "lowrank_ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("lowrank_ceiling", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_krylov_values_exact_on_a_low_rank_matrix(ceiling):
    # rank 6 with known singular values: any Krylov space of width >= 6 holds the whole range
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(300, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 6, generator=g, dtype=torch.float64))
    sv = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    A = (U * sv) @ V.T
    got = ceiling.block_krylov_values(A.float(), 6, 10, depth=1)
    assert torch.allclose(got.double(), sv, rtol=1e-5)


def test_block_krylov_depth_improves_a_flat_top(ceiling):
    A = torch.randn(600, 400, generator=torch.Generator().manual_seed(2))
    exact = torch.linalg.svdvals(A.double())[:16]
    errs = [float(((ceiling.block_krylov_values(A, 16, 20, d).double() - exact).abs() / exact).max())
            for d in (1, 3)]
    assert errs[1] < errs[0] < 0.5


def test_mkl_packed_products_match_float64(ceiling):
    try:
        ceiling._mkl()
    except (OSError, AttributeError):
        pytest.skip("this torch build does not export MKL's packed GEMM")
    g = torch.Generator().manual_seed(3)
    A = torch.randn(257, 131, generator=g)
    X, Y = torch.randn(131, 18, generator=g), torch.randn(257, 18, generator=g)
    pa = ceiling.PackedA(A, 18)
    C1, C2 = pa.products(X, Y)
    r1, r2 = A.double() @ X.double(), A.double().T @ Y.double()
    assert float((C1.double() - r1).abs().max() / r1.abs().max()) < 1e-5
    assert float((C2.double() - r2).abs().max() / r2.abs().max()) < 1e-5
    with pytest.raises(ValueError, match="must be"):
        pa.products(Y, X)


def _planted(m, n, sv, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sv), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sv), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(sv, dtype=torch.float64)) @ V.T).float()


def _eff_rank(sv):
    lam = torch.tensor(sv, dtype=torch.float64) ** 2
    p = lam / lam.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def test_slq_effective_rank_deflated_past_the_rank_is_exact(ceiling):
    sv = [10.0 / (i + 1) ** 0.6 for i in range(12)]
    est, half = ceiling.slq_effective_rank(_planted(200, 150, sv, 4), probes=4, steps=5, deflate=12)
    assert abs(est - _eff_rank(sv)) / _eff_rank(sv) < 1e-4 and half < 1e-3


def test_slq_effective_rank_interval_covers_the_exact_value(ceiling):
    sv = [5.0 / (i + 1) ** 0.3 for i in range(40)]
    exact = _eff_rank(sv)
    est, half = ceiling.slq_effective_rank(_planted(300, 120, sv, 5), probes=64, steps=45)
    assert half > 0 and abs(est - exact) <= half
    assert abs(est - exact) / exact < 0.1

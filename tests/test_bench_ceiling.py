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

"""Planted matrices for metric tests (imported by test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


def orthonormal(rng, n, k):
    """n×k matrix with orthonormal columns."""
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q[:, :k]

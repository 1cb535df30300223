"""The record of one analysed tensor (docs/metrics.md), declared once for every output that stores it.

The native engine returns each record as a dict of scalars and strings plus the per-direction arrays
named in :data:`ARRAYS` (and, with ``save_vectors``, the singular vectors under :data:`VECTORS`).
summary.json keeps the arrays cut to :func:`json_length` values, results.h5 stores them as datasets and
every other field as an attribute, and ``Comparison.to_pandas()`` makes one row of :func:`scalars`.
A test checks that the records the engine returns have exactly these arrays.
"""

from __future__ import annotations

#: per-direction float64 arrays of a record -> the record's rank field that bounds what summary.json keeps
#: (None: kept whole)
ARRAYS = {"sv_delta": "rank_delta", "sv_base": "rank_base", "sin_theta_left": None, "sin_theta_right": None}
#: the singular vectors (``save_vectors``): a dict of float32 matrices, in results.h5 only
VECTORS = "vectors"
#: spectra longer than this are cut to max(k, JSON_ARRAY_MIN) values in summary.json; results.h5 has them all
JSON_ARRAY_MIN = 32


def json_length(rec: dict, key: str) -> int:
    """How many values of the array ``key`` summary.json keeps for record ``rec``."""
    rank = ARRAYS[key]
    return max(JSON_ARRAY_MIN, int(rec.get(rank, 0) or 0)) if rank else len(rec[key])


def scalars(rec: dict) -> dict:
    """The record without its arrays and vectors: one value per field (``shape`` stays a list)."""
    return {k: v for k, v in rec.items() if k not in ARRAYS and k != VECTORS}

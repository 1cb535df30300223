"""summary.json: the records of docs/metrics.md as JSON (NaN -> null, spectra truncated)."""

from __future__ import annotations

import datetime as _dt

import numpy as np

from pysafe._atomic import json_ready
from pysafe._version import __version__
from pysafe.records import ARRAYS, VECTORS, json_length



def record_json(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if k == VECTORS:
            continue
        if k in ARRAYS and v is not None:
            v = np.asarray(v)[:json_length(rec, k)]
        out[k] = json_ready(v)
    return out


#: summary.json layout version. 2: effective_rank_delta over the whole spectrum (null when not computed),
#: sin_theta_*_chance = E[sin θ] (was 1 − k/n), no default max_rank cap; new tol, *_err, svd_method_delta/base,
#: svd_rel_error_delta/base, tol_reached_*, energy_rank_{50,90,99}_delta. 1 (unversioned): before.
SCHEMA_VERSION = 2


def stamp(schema_version: int) -> dict:
    """The first keys of every JSON file a report holds: its layout version, pysafe's version, when (UTC)."""
    return {"schema_version": schema_version, "pysafe_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def summary_dict(cmp) -> dict:
    return {
        **stamp(SCHEMA_VERSION),
        "base": cmp.base,
        "tuned": cmp.tuned,
        "params": json_ready(cmp.params),
        "scheme": cmp.scheme,
        "seconds": round(cmp.seconds, 3),
        "bytes_read": cmp.bytes_read,
        "cache": getattr(cmp, "cache", None),
        "preflight": {
            "only_in_base": len(cmp.preflight.only_in_base),
            "only_in_tuned": len(cmp.preflight.only_in_tuned),
            "shape_mismatch": cmp.preflight.shape_mismatch,
            "dtype_differs": cmp.preflight.dtype_differs,
            "filtered_out": cmp.preflight.filtered_out,
        },
        "matrices": [record_json(r) for r in cmp.records],
        "skipped": json_ready(cmp.skipped),
    }

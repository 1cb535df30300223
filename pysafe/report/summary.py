"""summary.json: the records of docs/metrics.md as JSON (NaN -> null, spectra truncated)."""

from __future__ import annotations

import datetime as _dt

import numpy as np

from pysafe._atomic import json_ready
from pysafe._version import __version__

#: arrays longer than this are cut to max(k, JSON_ARRAY_MIN) values in JSON; results.h5 has them all
JSON_ARRAY_MIN = 32
_ARRAY_KEYS = {"sv_delta": "rank_delta", "sv_base": "rank_base", "sin_theta_left": None, "sin_theta_right": None}


def record_json(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if k == "vectors":
            continue
        if k in _ARRAY_KEYS and v is not None:
            kk = _ARRAY_KEYS[k]
            keep = max(JSON_ARRAY_MIN, int(rec.get(kk, 0) or 0)) if kk else len(v)
            v = np.asarray(v)[:keep]
        out[k] = json_ready(v)
    return out


#: summary.json layout version. 2: effective_rank_delta over the whole spectrum (null when not computed),
#: sin_theta_*_chance = E[sin θ] (was 1 − k/n), no default max_rank cap; new tol, *_err, svd_method_delta/base,
#: svd_rel_error_delta/base, tol_reached_*, energy_rank_{50,90,99}_delta. 1 (unversioned): before.
SCHEMA_VERSION = 2


def summary_dict(cmp) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "pysafe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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

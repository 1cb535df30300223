"""results.h5: one group per tensor; scalars as attributes, spectra (and vectors) as datasets."""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np

from pysafe._version import __version__

_DATASETS = ("sv_delta", "sv_base", "sin_theta_left", "sin_theta_right")


def write_h5(cmp, path: str | os.PathLike) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["pysafe_version"] = __version__
        f.attrs["base"] = json.dumps(cmp.base)
        f.attrs["tuned"] = json.dumps(cmp.tuned)
        f.attrs["params"] = json.dumps(cmp.params)
        tensors = f.create_group("tensors")
        for rec in cmp.records:
            g = tensors.create_group(rec["name"])  # names keep their dots; '/' cannot occur in keys we pair
            for k, v in rec.items():
                if k in _DATASETS:
                    g.create_dataset(k, data=np.asarray(v, dtype=np.float64))
                elif k == "vectors":
                    for vn, arr in v.items():
                        arr = np.asarray(arr, dtype=np.float32)
                        chunks = (min(arr.shape[0], 4096), max(1, min(arr.shape[1], 64))) if arr.size else None
                        g.create_dataset(vn, data=arr, chunks=chunks)
                elif v is None:
                    g.attrs[k] = "null"
                elif isinstance(v, (list, tuple)):
                    g.attrs[k] = np.asarray(v)
                elif isinstance(v, float) and not math.isfinite(v):
                    g.attrs[k] = np.nan
                else:
                    g.attrs[k] = v
        sk = f.create_group("skipped")
        for i, s in enumerate(cmp.skipped):
            sk.attrs[s["name"] if "/" not in s["name"] else f"skipped_{i}"] = s["reason"]

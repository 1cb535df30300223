"""pysafe.records: the one declaration of a record's array fields, checked against what the engine returns and
against each output that stores records (summary.json, results.h5, the DataFrame)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pysafe
from pysafe.records import ARRAYS, VECTORS, json_length, scalars


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    pysafe.make_pair(d / "p", preset="tiny")
    return pysafe.compare(d / "p" / "base", d / "p" / "tuned", save_vectors=True)


def test_engine_records_have_exactly_the_declared_arrays(comparison):
    two_d = [r for r in comparison.records if len(r["shape"]) == 2]
    assert two_d
    for r in two_d:
        arrays = {k for k, v in r.items() if isinstance(v, np.ndarray)}
        assert arrays == set(ARRAYS), r["name"]
        assert isinstance(r[VECTORS], dict) and r[VECTORS]
        assert not any(isinstance(v, (np.ndarray, dict)) for v in scalars(r).values())


def test_summary_and_h5_store_what_the_schema_says(comparison, tmp_path):
    from pysafe.report import read_h5, write_report

    write_report(comparison, tmp_path / "r", plots=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    h5 = read_h5(tmp_path / "r" / "results.h5")["tensors"]
    checked = 0
    for rec, js in zip(comparison.records, summary["matrices"]):
        assert js["name"] == rec["name"] and VECTORS not in js
        for k in ARRAYS:
            if k in rec:
                checked += 1
                assert js[k] == pytest.approx(list(rec[k][:json_length(rec, k)]), nan_ok=True)
                np.testing.assert_array_equal(h5[rec["name"]][k], np.asarray(rec[k], np.float64))  # whole, in h5
        assert set(rec.get(VECTORS, {})) <= set(h5[rec["name"]])
    assert checked >= len(ARRAYS)


def test_dataframe_has_one_row_of_scalars_per_record(comparison):
    pytest.importorskip("pandas")
    df = comparison.to_pandas()
    assert len(df) == len(comparison.records)
    assert not set(ARRAYS) & set(df.columns) and VECTORS not in df.columns and "delta_rel" in df.columns

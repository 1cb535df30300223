"""``pysafe analyze``'s analysis flags are generated from :class:`pysafe.weights.Options`: one flag per field,
the same defaults, ranges that agree with ``Options.validate``, and every value reaching ``compare``."""

from __future__ import annotations

import dataclasses
import math

import click
import pytest
from click.testing import CliRunner

from pysafe.cli import main
from pysafe.cli.analyze import analyze
from pysafe.cli.options import option_flag
from pysafe.weights import Options

FIELDS = dataclasses.fields(Options)


def _params_by_name():
    return {p.name: p for p in analyze.params if isinstance(p, click.Option)}


def test_every_field_has_exactly_one_flag_with_its_default():
    params = _params_by_name()
    for f in FIELDS:
        assert f.name in params, f"Options.{f.name} has no flag in pysafe analyze"
        p = params[f.name]
        flag = option_flag(f)
        assert flag in p.opts, (f.name, p.opts)
        assert p.default == f.default, (f.name, p.default, f.default)
        assert p.help and p.help == (f.metadata["help"] if f.name != "device" else p.help)
        if f.default is not None:
            assert p.show_default, f.name
        # no other option of the command claims the same flag or the same destination
        owners = [q.name for q in analyze.params if flag in q.opts or q.name == f.name]
        assert owners == [f.name], (f.name, owners)
    help_text = CliRunner().invoke(main, ["analyze", "--help"], terminal_width=200).output
    for f in FIELDS:
        assert help_text.count(option_flag(f) + " ") + help_text.count(option_flag(f) + "/") >= 1, f.name


def _outside_and_inside(lo, hi, lo_open, hi_open, is_int):
    """Values just outside each bound (rejected) and just inside (accepted)."""
    step = 1 if is_int else 1e-9
    bad, good = [], []
    if lo is not None:
        bad.append(lo if lo_open else lo - step)
        good.append(lo + step if lo_open else lo)
    if hi is not None:
        bad.append(hi if hi_open else hi + step)
        good.append(hi - step if hi_open else hi)
    return bad, good


@pytest.mark.parametrize("f", [f for f in FIELDS if "range" in f.metadata], ids=lambda f: f.name)
def test_cli_range_agrees_with_validate(f):
    """The range the flag enforces is the one Options.validate enforces (the Python API's check)."""
    is_int = "int" in str(f.type)  # the annotation: "int", "int | None", "float | None", …
    bad, good = _outside_and_inside(*f.metadata["range"], is_int)
    assert bad, f.name
    for v in bad:
        with pytest.raises(ValueError, match=f.name):
            Options(**{f.name: v}).validate()
        r = CliRunner().invoke(main, ["analyze", "a", "b", option_flag(f), str(v)])
        assert r.exit_code == 2 and option_flag(f) in r.output, r.output
    for v in good:
        Options(**{f.name: v}).validate()
    if not is_int:  # NaN is outside every range
        with pytest.raises(ValueError):
            Options(**{f.name: math.nan}).validate()


@pytest.mark.parametrize("f", [f for f in FIELDS if "choices" in f.metadata], ids=lambda f: f.name)
def test_cli_choices_agree_with_validate(f):
    for c in f.metadata["choices"]:
        Options(**{f.name: c}).validate()
    with pytest.raises(ValueError, match=f.name):
        Options(**{f.name: "not-a-choice"}).validate()


def test_validate_errors_name_the_flag():
    r = CliRunner().invoke(main, ["analyze", "a", "b", "--include", "("])
    assert r.exit_code == 2 and "'--include'" in r.output and "regular expression" in r.output
    r = CliRunner().invoke(main, ["analyze", "a", "b", "--device", "gpu"])
    assert r.exit_code == 2 and "'--device'" in r.output and "'gpu'" in r.output


def test_every_flag_value_reaches_compare(monkeypatch, tmp_path):
    """Non-default values for every field on the command line arrive in compare() unchanged."""
    import pysafe.weights

    seen = {}

    class Stop(Exception):
        pass

    def fake_compare(base, tuned, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(pysafe.weights, "compare", fake_compare)
    values = dict(include="mlp", exclude="attn", rank=3, energy=0.5, base_rank=4, base_energy=0.75, exact=True,
                  max_rank=7, exact_max_dim=12, oversample=5, power_iters=2, tol=0.01, base_tol=0.05, spectrum="none", center=True,
                  dtype="f64", threads=1, seed=9, save_vectors=True, strict=True, device="cuda:1")
    assert set(values) == {f.name for f in FIELDS}, "a new Options field: add a non-default value here"
    for f in FIELDS:
        assert values[f.name] != f.default, f.name
    args = ["analyze", "a", "b", "--out", str(tmp_path / "out"), "--no-cache", "--no-progress"]
    for f in FIELDS:
        v = values[f.name]
        if isinstance(v, bool):
            args.append(option_flag(f) if v else "--no-" + option_flag(f)[2:])
        else:
            args += [option_flag(f), str(v)]
    r = CliRunner().invoke(main, args)
    assert "internal error (Stop)" in r.output, r.output
    assert {k: seen[k] for k in values} == values

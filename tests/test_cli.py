"""The ``pysafe`` command through click's CliRunner: outputs, exit codes, one-line errors (STYLE.md §5, §7)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import save_file as save_numpy

import bad_headers
import pysafe
from pysafe.cli import main

#: every option of `pysafe analyze` that summary.json must record under "params"
PARAMS = ("include", "exclude", "rank", "energy", "base_rank", "base_energy", "exact", "center", "dtype", "threads",
          "seed", "save_vectors", "strict")
#: the keys of engine.md §5 (plus identity) that every 2-D record carries
MATRIX_KEYS = ("name", "layer", "module", "shape", "dtype_base", "dtype_tuned", "delta_fro", "delta_rel", "sv_delta",
               "sv_base", "rank_delta", "rank_base", "energy_topk_delta", "stable_rank_delta", "effective_rank_delta",
               "null_frac_left", "null_frac_right", "null_frac_left_chance", "null_frac_right_chance",
               "sin_theta_left", "overlap_left", "overlap_right", "nonfinite", "svd_method", "svd_rel_error")
PLOTS = {"sv_decay.png", "heatmap_delta_rel.png", "heatmap_null_frac_left.png", "heatmap_overlap_left.png",
         "heatmap_effective_rank_delta.png"}
FAST = ["--threads", "1", "--no-plots"]  # one thread: tiny matrices, and robust on a loaded machine


def _run(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result: Result) -> str:
    """Exit code 1 and exactly one 'Error: ...' line on stderr, no traceback; returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    return lines[0]


def _no_staging(parent: Path) -> None:
    assert not list(parent.glob(".*pysafe-tmp*")), list(parent.iterdir())


def _tree(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = pysafe.make_pair(tmp_path_factory.mktemp("pair"), "tiny")
    return root / "base", root / "tuned"


@pytest.fixture(scope="module")
def report(pair, tmp_path_factory):
    """One full analyze run (with plots) shared by the output-format tests."""
    base, tuned = pair
    out = tmp_path_factory.mktemp("report") / "out"
    result = _run("analyze", base, tuned, "--out", out, "--threads", "1", "--seed", "3", "--exact")
    assert result.exit_code == 0, result.output
    return out, result


def _mismatched_pair(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    w = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((12, 8)).astype(np.float32),
         "model.layers.0.mlp.down_proj.weight": rng.standard_normal((8, 12)).astype(np.float32)}
    t = {k: v + np.float32(0.01) for k, v in w.items()}
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((8, 13), np.float32)
    for side, tensors in (("base", w), ("tuned", t)):
        (root / side).mkdir(parents=True)
        save_numpy(tensors, str(root / side / "model.safetensors"))
    return root / "base", root / "tuned"


# -- a good run -------------------------------------------------------------------------------------
def test_analyze_writes_summary(pair, report):
    base, tuned = pair
    out, result = report
    assert "21 tensors analysed, 0 skipped" in result.stdout
    s = json.loads((out / "summary.json").read_text())
    for key in ("pysafe_version", "created", "base", "tuned", "params", "matrices", "skipped"):
        assert key in s
    assert s["pysafe_version"] == pysafe.__version__
    assert dt.datetime.fromisoformat(s["created"]).tzinfo is not None
    for side, path in (("base", base), ("tuned", tuned)):
        d = s[side]
        assert set(d) >= {"path", "format", "n_tensors", "header_digest"}
        assert d["path"] == str(path.resolve()) and d["format"] == "sharded" and d["n_tensors"] == 21
        assert re.fullmatch(r"[0-9a-f]{64}", d["header_digest"])
    assert s["base"]["header_digest"] != s["tuned"]["header_digest"]
    for p in PARAMS:
        assert p in s["params"], p
    assert s["params"]["seed"] == 3 and s["params"]["threads"] == 1 and s["params"]["exact"] is True
    assert s["params"]["energy"] == 0.9 and s["params"]["rank"] is None and s["params"]["strict"] is False
    assert s["skipped"] == []
    assert len(s["matrices"]) == 21
    matrices = [m for m in s["matrices"] if len(m["shape"]) == 2]
    assert len(matrices) == 16  # 7 per layer × 2, embed_tokens, lm_head
    for m in matrices:
        missing = [k for k in MATRIX_KEYS if k not in m]
        assert not missing, (m["name"], missing)
        assert m["dtype_base"] == m["dtype_tuned"] == "BF16"
        assert m["nonfinite"] == 0
        if "proj" in m["name"]:  # make_pair plants a ΔW in every projection
            assert m["svd_method"] == "exact" and m["delta_rel"] > 0
            assert len(m["sv_delta"]) >= m["rank_delta"] >= 1
        else:  # embeddings are unchanged: no spectrum, and the record says why
            assert m["delta_fro"] == 0 and m["rank_delta"] == 0 and m["svd_method"] == "none"
    up = next(m for m in matrices if m["name"] == "model.layers.1.mlp.up_proj.weight")
    assert (up["layer"], up["module"], up["shape"]) == (1, "up", [176, 64])
    assert up["rank_delta"] <= 8  # the planted ΔW has rank 8
    vectors = [m for m in s["matrices"] if len(m["shape"]) == 1]
    assert all("delta_rel" in m and "sv_delta" not in m for m in vectors)


def test_analyze_writes_h5_and_plots(report):
    h5py = pytest.importorskip("h5py")
    out, _ = report
    s = json.loads((out / "summary.json").read_text())
    with h5py.File(out / "results.h5", "r") as f:
        tensors = f["tensors"]
        assert set(tensors) == {m["name"] for m in s["matrices"]}
        for m in s["matrices"]:
            g = tensors[m["name"]]
            assert g.attrs["delta_rel"] == pytest.approx(m["delta_rel"])
            if len(m["shape"]) == 2:
                sv = g["sv_delta"][()]
                assert sv.ndim == 1 and sv.size >= g.attrs["rank_delta"]
                np.testing.assert_allclose(sv[:len(m["sv_delta"])], m["sv_delta"], rtol=1e-12)
                assert g.attrs["svd_method"] == m["svd_method"]
                assert "U_delta" not in g  # only with --save-vectors
    plots = {p.name for p in (out / "plots").iterdir()}
    assert plots == PLOTS
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _no_staging(out.parent)


def test_analyze_save_vectors(pair, tmp_path):
    h5py = pytest.importorskip("h5py")
    base, tuned = pair
    out = tmp_path / "out"
    result = _run("analyze", base, tuned, "--out", out, "--save-vectors", "--include", r"layers\.0\.", *FAST)
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert s["params"]["save_vectors"] is True and s["params"]["include"] == r"layers\.0\."
    assert {m["name"] for m in s["matrices"]} == {n for n in pysafe.Checkpoint.open(base).tensors if ".0." in n}
    with h5py.File(out / "results.h5", "r") as f:
        for m in s["matrices"]:
            g = f["tensors"][m["name"]]
            if len(m["shape"]) == 1:
                assert "U_delta" not in g
                continue
            n_out, n_in = m["shape"]
            kd, kb = m["rank_delta"], m["rank_base"]
            assert g["U_delta"].shape == (n_out, kd) and g["V_delta"].shape == (n_in, kd)
            assert g["U_base"].shape == (n_out, kb) and g["V_base"].shape == (n_in, kb)
            U = g["U_delta"][()].astype(np.float64)
            np.testing.assert_allclose(U.T @ U, np.eye(kd), atol=1e-4)


def test_progress_bar_on_stderr(pair, tmp_path):
    base, tuned = pair
    result = _run("analyze", base, tuned, "--out", tmp_path / "out", "--progress", *FAST)
    assert result.exit_code == 0, result.output
    assert "tensors" in result.stderr and "21/21" in result.stderr and " GB" in result.stderr
    assert "21/21" not in result.stdout  # the bar is not on stdout
    assert "\r" not in result.stderr and "\u2501" not in result.stderr  # stderr is a log here: plain lines
    quiet = _run("analyze", base, tuned, "--out", tmp_path / "quiet", "--no-progress", *FAST)
    assert quiet.exit_code == 0 and "21/21" not in quiet.stderr
    auto = _run("analyze", base, tuned, "--out", tmp_path / "auto", *FAST)  # stderr is not a terminal: no bar
    assert auto.exit_code == 0 and "21/21" not in auto.stderr and "\r" not in auto.stderr


# -- one-line errors --------------------------------------------------------------------------------
def test_missing_base(pair, tmp_path):
    _, tuned = pair
    missing = tmp_path / "nope"
    line = _one_line_error(_run("analyze", missing, tuned, "--out", tmp_path / "out", *FAST))
    assert str(missing) in line
    assert not (tmp_path / "out").exists()


def test_malformed_header_as_tuned(pair, tmp_path):
    base, _ = pair
    bad = bad_headers.lying_header(tmp_path)
    line = _one_line_error(_run("analyze", base, bad, "--out", tmp_path / "out", *FAST))
    assert bad.name in line and "[2, 2]" in line and "span 12 bytes" in line


def test_no_common_tensors(pair, tmp_path):
    base, _ = pair
    other = tmp_path / "other"
    other.mkdir()
    save_numpy({"encoder.weight": np.ones((4, 4), np.float32)}, str(other / "model.safetensors"))
    line = _one_line_error(_run("analyze", base, other, "--out", tmp_path / "out", *FAST))
    assert "share no tensor names" in line and "encoder.weight" in line


def test_strict_shape_mismatch(tmp_path):
    base, tuned = _mismatched_pair(tmp_path)
    ok = _run("analyze", base, tuned, "--out", tmp_path / "lenient", *FAST)
    assert ok.exit_code == 0, ok.output
    assert "shape mismatch: model.layers.0.mlp.down_proj.weight" in ok.stderr  # said in pre-flight
    s = json.loads((tmp_path / "lenient" / "summary.json").read_text())
    assert [x["name"] for x in s["skipped"]] == ["model.layers.0.mlp.down_proj.weight"]
    line = _one_line_error(_run("analyze", base, tuned, "--out", tmp_path / "strict", "--strict", *FAST))
    assert "--strict" in line and "model.layers.0.mlp.down_proj.weight" in line
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("args,value", [(["--energy", "1.5"], "1.5"), (["--energy", "0"], "0"),
                                        (["--rank", "0"], "0"), (["--dtype", "f16"], "f16"),
                                        (["--include", "("], "("), (["--base-energy", "-0.1"], "-0.1")])
def test_bad_option_values(pair, tmp_path, args, value):
    base, tuned = pair
    result = _run("analyze", base, tuned, "--out", tmp_path / "out", *args, *FAST)
    assert result.exit_code == 2, result.output  # click usage error
    assert "Traceback" not in result.output
    option = args[0].lstrip("-").replace("-", "_")
    assert option in result.stderr.replace("-", "_") and value in result.stderr
    assert f"'{args[0]}'" in result.stderr  # names the flag as typed
    assert not (tmp_path / "out").exists()


def test_out_is_an_existing_file(pair, tmp_path):
    base, tuned = pair
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    result = _run("analyze", base, tuned, "--out", f, *FAST)
    assert result.exit_code == 2 and "report.txt" in result.stderr
    assert f.read_text() == "keep me"


def test_out_not_empty_needs_overwrite(pair, tmp_path):
    base, tuned = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text('{"old": true}')
    before = _tree(out)
    result = _run("analyze", base, tuned, "--out", out, *FAST)
    assert result.exit_code != 0
    assert "--overwrite" in result.stderr and str(out) in result.stderr
    assert _tree(out) == before
    # that summary.json is the user's (pysafe did not write it): --overwrite refuses to replace it
    line = _one_line_error(_run("analyze", base, tuned, "--out", out, "--overwrite", *FAST))
    assert "summary.json" in line and str(out) in line and "not written by pysafe" in line
    assert _tree(out) == before
    (out / "summary.json").unlink()
    result = _run("analyze", base, tuned, "--out", out, "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"  # only pysafe's own outputs are replaced
    assert "matrices" in json.loads((out / "summary.json").read_text())
    _no_staging(tmp_path)


def test_failure_leaves_no_partial_report(pair, tmp_path):
    base, tuned = pair
    broken = tmp_path / "tuned-truncated"
    shutil.copytree(tuned, broken)
    shard = max(broken.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    bad_headers.truncate_file(shard, shard.stat().st_size // 2)
    parent = tmp_path / "reports"
    parent.mkdir()
    line = _one_line_error(_run("analyze", base, broken, "--out", parent / "out", *FAST))
    assert shard.name in line and "truncated" in line
    assert not (parent / "out" / "summary.json").exists()
    _no_staging(parent)


def test_failure_while_writing_keeps_the_old_report(pair, tmp_path, monkeypatch):
    import pysafe.report

    base, tuned = pair
    out = tmp_path / "out"
    assert _run("analyze", base, tuned, "--out", out, *FAST).exit_code == 0
    old = _tree(out)

    def disk_full(cmp, where, **_):
        (Path(where) / "half.png").write_bytes(b"\x89PNG")
        raise OSError(28, "No space left on device", str(Path(where) / "half.png"))

    monkeypatch.setattr(pysafe.report, "write_plots", disk_full)
    result = _run("analyze", base, tuned, "--out", out, "--overwrite", "--plots", "--threads", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.stderr.splitlines()[-1]
    assert "No space left on device" in line and str(out) in line and "plots/half.png" in line
    assert _tree(out) == old  # the complete old report is untouched
    _no_staging(tmp_path)
    fresh = tmp_path / "fresh"
    result = _run("analyze", base, tuned, "--out", fresh, "--plots", "--threads", "1")
    assert result.exit_code == 1
    assert not (fresh / "summary.json").exists()
    _no_staging(tmp_path)


def test_debug_shows_traceback(pair, tmp_path):
    _, tuned = pair
    result = _run("analyze", tmp_path / "nope", tuned, "--out", tmp_path / "out", "--debug", *FAST)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


# -- other commands ---------------------------------------------------------------------------------
def test_make_pair_command(tmp_path):
    out = tmp_path / "pair"
    result = _run("make-pair", "--preset", "tiny", "--out", out)
    assert result.exit_code == 0, result.output
    assert "tiny" in result.stdout
    for side in ("base", "tuned"):
        index = json.loads((out / side / "model.safetensors.index.json").read_text())
        assert len(index["weight_map"]) == 21
        assert all((out / side / shard).exists() for shard in set(index["weight_map"].values()))
    ckpt = pysafe.Checkpoint.open(out / "base")
    assert ckpt.format == "sharded" and len(ckpt.tensors) == 21
    # the same pair again is reused; a different one is refused with one line
    assert _run("make-pair", "--preset", "tiny", "--out", out).exit_code == 0
    line = _one_line_error(_run("make-pair", "--preset", "tiny", "--seed", "1", "--out", out))
    assert str(out) in line


def test_make_pair_base_spectrum(tmp_path):
    """--base-spectrum powerlaw:A: every stored W_base has σ_i ∝ i^-A (up to bf16 rounding), checked with
    a float64 SVD of the stored values; a bad value is one line naming the option."""
    from safetensors.torch import load_file as load_torch  # bf16 is read through torch

    out = tmp_path / "pair"
    result = _run("make-pair", "--preset", "tiny", "--base-spectrum", "powerlaw:1.0", "--out", out)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "base" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    w = load_torch(str(out / "base" / index["weight_map"][name]))[name].double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    ratio = s[:20] / (s[0] * np.arange(1, 21) ** -1.0)
    np.testing.assert_allclose(ratio, 1.0, rtol=0.02)
    # the default base stays Gaussian (flat at the top: σ_2/σ_1 far from 1/2)
    gauss = tmp_path / "gauss"
    assert _run("make-pair", "--preset", "tiny", "--out", gauss).exit_code == 0
    wg = load_torch(str(gauss / "base" / index["weight_map"][name]))[name].double().numpy()
    sg = np.linalg.svd(wg, compute_uv=False)
    assert sg[1] / sg[0] > 0.7
    bad = _run("make-pair", "--preset", "tiny", "--base-spectrum", "lowrank", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "Traceback" not in bad.stderr  # a usage error naming the option and value
    assert "'--base-spectrum'" in bad.stderr and "'lowrank'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_version():
    result = _run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pysafe, version {pysafe.__version__}"


def test_unknown_command_is_a_usage_error():
    result = _run("analyse")
    assert result.exit_code == 2 and "analyse" in result.stderr

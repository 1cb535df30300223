"""``pysafe track`` / ``pysafe.track``: every checkpoint of a run against one base, W_base's SVDs computed once;
track.json, track.csv, the plots and the page's Trajectory section."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import pysafe
from pysafe.cli import main
from pysafe.lab.config import stage_settings
from pysafe.lab.train import train
from pysafe.report.track import TRACK_FILES, x_axis
from pysafe.trajectory import expand_checkpoints, matrix_metrics

from recordkit import assert_same_records


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A tiny pretrained base and an SSFT run of 7 steps from it keeping every 2nd step (2, 4, 6; the final
    step 7 is only in the run directory itself)."""
    root = tmp_path_factory.mktemp("run")
    pre = stage_settings("tiny", "pretrain")
    train("pretrain", root / "base", model_config=pre.model, recipe=pre.recipe,
          train_config=replace(pre.train, steps=6))
    ft = stage_settings("tiny", "ssft")
    train("ssft", root / "run", train_config=replace(ft.train, steps=7, ckpt_every=5, keep_every=2,
                                                      lr_max=3e-3), init=root / "base")
    return root / "base", root / "run"


def _same_records(a: list[dict], b: list[dict]):
    assert_same_records(a, b, ignore=("time_", "base_svd_cached"))


def test_checkpoints_are_ordered_by_step_and_the_run_itself_comes_last(lab_run, tmp_path):
    base, run = lab_run
    items = expand_checkpoints(run)
    assert [s for _, s in items] == [2, 4, 6, 7]
    assert items[-1][0] == str(run) and items[0][0].endswith("steps/step_000002")
    # explicit paths keep the order given; a checkpoint without a step is labelled by its name
    given = [run / "steps" / "step_000006", base, run / "steps" / "step_000002"]
    assert [s for _, s in expand_checkpoints(given)] == [6, 6, 2]  # the base's config.json records steps_done 6
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_checkpoints([run, tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="nope"):
        pysafe.track(base, run, aligned=tmp_path / "nope")
    with pytest.raises(ValueError, match="2 given for 4 checkpoints"):
        pysafe.track(base, run, labels=["a", "b"])
    traj = pysafe.track(base, given, labels=["six", "base", "two"], cache=False, include=r"c_fc")
    assert [p.label for p in traj.points] == ["six", "base", "two"] and [p.step for p in traj.points] == [6, 6, 2]
    assert all(r["delta_fro"] == 0 for r in traj.points[1].records)  # the base against itself


def test_base_svds_are_computed_once_and_the_records_are_those_of_separate_comparisons(lab_run, tmp_path):
    base, run = lab_run
    traj = pysafe.track(base, run, cache=tmp_path / "cache")
    assert [p.step for p in traj.points] == [2, 4, 6, 7]
    assert [p.label for p in traj.points] == ["step 2", "step 4", "step 6", "step 7"]
    mats = [r for r in traj.points[0].records if len(r["shape"]) == 2]
    assert len(mats) >= 4
    assert not any(r["base_svd_cached"] for r in mats)
    for p in traj.points[1:]:  # the 2nd..nth checkpoints read every base decomposition from the cache
        m = [r for r in p.records if len(r["shape"]) == 2]
        assert all(r["base_svd_cached"] and r["time_svd_base"] == 0 for r in m), p.label
        assert p.comparison.cache["hits"] == len(m) and p.comparison.cache["misses"] == 0
    assert traj.cache["misses"] == len(mats) and traj.cache["hits"] == 3 * len(mats)
    # bit for bit the records of an uncached comparison of each checkpoint on its own
    for p, (path, _) in zip(traj.points, expand_checkpoints(run)):
        _same_records(p.records, pysafe.compare(base, path).records)
    # the default (a temporary cache for the call) gives the same records
    for p, q in zip(traj.points, pysafe.track(base, run).points):
        _same_records(p.records, q.records)


def test_numbers_against_numpy_float64(lab_run):
    """delta_rel, the whole-model ratio, the effective rank and the mean sin θ of the last checkpoint,
    recomputed from the files with the safetensors library and a float64 SVD."""
    base, run = lab_run
    p = pysafe.track(base, run, cache=False).points[-1]
    wb, wt = load_file(base / "model.safetensors"), load_file(run / "model.safetensors")
    d2 = b2 = 0.0
    for name in wb:
        d = wt[name].astype(np.float64) - wb[name].astype(np.float64)
        d2 += float((d ** 2).sum())
        b2 += float((wb[name].astype(np.float64) ** 2).sum())
    s = p.summary()
    assert s["delta_rel"] == pytest.approx(math.sqrt(d2 / b2), rel=1e-5)
    rec = max((r for r in p.records if len(r["shape"]) == 2), key=lambda r: r["delta_rel"])
    B = wb[rec["name"]].astype(np.float64)
    D = wt[rec["name"]].astype(np.float64) - B
    assert rec["delta_rel"] == pytest.approx(np.linalg.norm(D) / np.linalg.norm(B), rel=1e-5)
    sv = np.linalg.svd(D, compute_uv=False)
    q = sv ** 2 / (sv ** 2).sum()
    q = q[q > 0]
    assert rec["effective_rank_delta"] == pytest.approx(math.exp(-(q * np.log(q)).sum()), rel=1e-4)
    Ub = np.linalg.svd(B)[0][:, :rec["rank_base"]]
    Ud = np.linalg.svd(D)[0][:, :rec["rank_delta"]]
    sin = np.linalg.norm(Ud - Ub @ (Ub.T @ Ud), axis=0)
    assert matrix_metrics(rec)["sin_theta_left_mean"] == pytest.approx(sin.mean(), abs=2e-4)


def test_cli_writes_json_csv_plots_and_the_trajectory_page(lab_run, tmp_path):
    base, run = lab_run
    out = tmp_path / "t"
    r = CliRunner()
    res = r.invoke(main, ["track", str(base), str(run), "--out", str(out), "--cache", str(tmp_path / "c")],
                   catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "4 checkpoints" in res.output and "step 7" in res.output
    for f in TRACK_FILES:
        assert (out / f).is_file(), f
    doc = json.loads((out / "track.json").read_text())
    assert doc["schema_version"] == 1 and doc["cache"]["hits"] == 3 * doc["cache"]["misses"]
    assert [c["step"] for c in doc["checkpoints"]] == [2, 4, 6, 7]
    last = doc["checkpoints"][-1]
    assert last["path"] == str(run.resolve()) and last["summary"]["matrices"] == sum(
        1 for m in last["matrices"] if len(m["shape"]) == 2)
    with open(out / "track.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one row per checkpoint × tensor × metric, the values those of the JSON records
    assert len(rows) == sum(len(matrix_metrics(m)) for c in doc["checkpoints"] for m in c["matrices"])
    pick = next(x for x in rows if x["step"] == "7" and x["metric"] == "delta_rel" and x["module"] == "up")
    rec = next(m for m in last["matrices"] if m["name"] == pick["name"])
    assert float(pick["value"]) == rec["delta_rel"]
    html = (out / "index.html").read_text()
    assert 'id="trajectory"' in html and "plots/track_sin_theta.png" in html and "chance" in html
    # pysafe report rebuilds the page from the files alone
    (out / "index.html").unlink()
    assert r.invoke(main, ["report", str(out)]).exit_code == 0
    assert 'id="trajectory"' in (out / "index.html").read_text()


def test_cli_bad_input_is_one_line_and_writes_nothing(lab_run, tmp_path, monkeypatch):
    base, run = lab_run
    r = CliRunner()
    res = r.invoke(main, ["track", str(base), str(tmp_path / "missing"), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 1 and "missing: no such file or directory" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o1").exists()
    res = r.invoke(main, ["track", str(base), str(run), "--ray", "local:x", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "local:N" in res.output and not (tmp_path / "o2").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    for cmd in (["track", str(base), str(run)], ["analyze", str(base), str(run)]):
        res = r.invoke(main, cmd + ["--ray", "local:2", "--out", str(tmp_path / "o3")])
        assert res.exit_code == 1 and 'pip install "pysafe[ray]"' in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o3").exists()


def test_without_ray_ray_is_never_imported(lab_run, tmp_path):
    base, run = lab_run
    code = ("import sys\nfrom click.testing import CliRunner\nfrom pysafe.cli import main\n"
            "r = CliRunner().invoke(main, ['track', sys.argv[1], sys.argv[2], '--out', sys.argv[3], '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n"
            "r = CliRunner().invoke(main, ['analyze', sys.argv[1], sys.argv[2], '--out', sys.argv[4], '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print('ray' in sys.modules)\n")
    # cwd=tmp_path: from the repository root, `python -c` would import the source tree, not the install
    r = subprocess.run([sys.executable, "-c", code, str(base), str(run), str(tmp_path / "t"), str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_x_axis_is_the_step_only_when_the_steps_increase():
    doc = {"checkpoints": [{"step": 2, "label": "step 2"}, {"step": 5, "label": "step 5"}]}
    x, label, ticks = x_axis(doc)
    assert list(x) == [2, 5] and label == "training step" and ticks is None
    for pts in ([{"step": 4, "label": "step 4"}, {"step": 2, "label": "step 2"}],
                [{"step": 4, "label": "step 4"}, {"step": None, "label": "final"}]):
        x, label, ticks = x_axis({"checkpoints": pts})
        assert list(x) == [0, 1] and ticks == [p["label"] for p in pts]


def test_to_pandas_is_the_tidy_rows(lab_run):
    pd = pytest.importorskip("pandas")
    traj = pysafe.track(*lab_run, cache=False, include=r"c_fc")
    df = traj.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["index", "step", "label", "name", "layer", "module",
                                                                  "metric", "value"]
    assert len(df) == len(list(traj.rows())) and set(df["step"]) == {2, 4, 6, 7}


def test_drift_against_an_aligned_reference_along_the_trajectory(lab_run, tmp_path):
    """track(aligned=...): checkpoints planted at W_aligned − c·ΔA give undo = c (an independent number), and
    each point's drift equals pysafe.drift on that checkpoint; track.json, track.csv, the plot and the page
    carry it, and the CLI takes --aligned."""
    from safetensors.numpy import save_file

    base, run = lab_run
    aligned = run / "steps" / "step_000006"
    wb, wa = load_file(base / "model.safetensors"), load_file(aligned / "model.safetensors")
    cfg = json.loads((aligned / "config.json").read_text())
    ckpts = []
    for i, c in enumerate((0.0, 0.25, 0.5)):
        d = tmp_path / f"c{i}"
        d.mkdir()
        save_file({k: (wa[k] - c * (wa[k] - wb[k]).astype(np.float64)).astype(np.float32) if wa[k].ndim == 2
                   else wa[k] for k in wa}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, "step": 10 * (i + 1)}))
        ckpts.append(d)
    traj = pysafe.track(base, ckpts[1:], aligned=aligned, cache=False)
    assert traj.aligned == str(aligned.resolve())
    for p, c in zip(traj.points, (0.25, 0.5)):
        assert p.drift["undo"] == pytest.approx(c, abs=1e-5)
        direct = pysafe.drift(base, aligned, p.path).summary["model"]
        assert all(p.drift[k] == direct[k] for k in ("undo", "energy_both", "energy_both_ratio", "cos_TA"))
        assert "undoes" in p.drift["verdict"]
    assert {r["metric"] for r in traj.rows() if r["name"] == "(model)"} >= {"drift_undo", "drift_energy_both_ratio"}
    out = tmp_path / "t"
    res = CliRunner().invoke(main, ["track", str(base), *map(str, ckpts), "--aligned", str(aligned), "--out", str(out),
                                    "--no-cache"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "track.json").read_text())
    assert [round(p["drift"]["undo"], 4) for p in doc["checkpoints"]] == [0.0, 0.25, 0.5]
    assert (out / "plots" / "track_drift.png").stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert "track_drift.png" in page and "share of ΔA it undoes" in page
    with open(out / "track.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows if r["metric"] == "drift_undo"] == pytest.approx([0, 0.25, 0.5], abs=1e-5)

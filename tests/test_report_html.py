"""index.html (the report page), `pysafe report DIR`, and the Python API's small courtesies."""

from __future__ import annotations

import importlib.util
import json
import pydoc
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import pysafe
from pysafe.cli import main
from pysafe.report.html import build_index, wilson_interval, write_index

ROOT = Path(__file__).resolve().parents[1]


def _browser_tool():
    spec = importlib.util.spec_from_file_location("report_browser", ROOT / "bench" / "report_browser.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real `pysafe analyze` report (with plots) of a tiny synthetic pair."""
    root = pysafe.make_pair(tmp_path_factory.mktemp("pair"), "tiny")
    out = tmp_path_factory.mktemp("rep") / "report"
    res = CliRunner().invoke(main, ["analyze", str(root / "base"), str(root / "tuned"), "--out", str(out),
                                    "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (50, 100), (441, 500), (500, 500), (1, 2000)])
def test_wilson_interval_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k / n, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_analyze_page_links_every_file_and_cites_the_numbers(report):
    page = (report / "index.html").read_text()
    tool = _browser_tool()
    problems, parsed = tool.static_check(report)
    assert problems == []
    assert sorted(parsed.images) == sorted(f"plots/{p.name}" for p in (report / "plots").glob("*.png"))
    for f in ("summary.json", "results.h5"):
        assert f'href="{f}"' in page
    assert "http://" not in page and "https://" not in page  # offline
    # the findings cite the mean share outside the base's column space and its chance level, recomputed here
    s = json.loads((report / "summary.json").read_text())
    recs = [r for r in s["matrices"] if r.get("null_frac_left") is not None]
    mv = np.mean([r["null_frac_left"] for r in recs])
    mc = np.mean([r["null_frac_left_chance"] for r in recs])
    assert f"on average {mv:.3f} of ΔW's energy lies outside" in page and f"against {mc:.3f} for a random" in page
    below = sum(r["null_frac_left"] < r["null_frac_left_chance"] for r in recs)
    assert f"{below} of {len(recs)} matrices are below chance" in page
    for words in ("What was compared", "Findings", "Per-layer tables", "Files in this folder", "Contents"):
        assert words in page
    assert s["tuned"]["header_digest"][:16] in page


def test_report_command_rebuilds_the_page_and_keeps_a_users_page(report, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(report, d)
    (d / "index.html").unlink()
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 0, res.output
    assert (d / "index.html").read_text().startswith("<!DOCTYPE html>")
    assert "index.html" in json.loads((d / ".pysafe-manifest.json").read_text())["files"]
    # a page of the user's (not in the manifest) is never replaced
    m = json.loads((d / ".pysafe-manifest.json").read_text())
    m["files"].remove("index.html")
    (d / ".pysafe-manifest.json").write_text(json.dumps(m))
    (d / "index.html").write_text("mine")
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 1 and "not written by pysafe" in res.output and "Traceback" not in res.output
    assert (d / "index.html").read_text() == "mine"


def _lab_folder(d: Path, claims: list, group_names=("std_safe", "std_unsafe")):
    (d / "eval").mkdir(parents=True)
    for name, follow in (("pretrained", 1.0), ("ssft", 0.882)):
        (d / "eval" / f"{name}.json").write_text(json.dumps({
            "checkpoint": f"/x/{name}", "table": {"safe_follow": follow, "unsafe_refuse": 0.476 if name == "ssft" else 0.0,
                                                   "jb_co_task": 0.844},
            "sets": {"std_safe": {"n": 500}, "std_unsafe": {"n": 500}, "jb_co_task": {"n": 500}}}))
    (d / "claims.json").write_text(json.dumps(claims))
    s, u = group_names
    (d / "clusters" / "ssft").mkdir(parents=True)
    (d / "clusters" / "ssft" / "clusters.json").write_text(json.dumps({"layers": [0, 1, 2], "groups": {
        s: {"n": 10, "tau_mean": [0, 0.1, 0.5], "tau_std": [0, 0, 0], "nearest_mean_acc": [0.5, 0.6, 0.8]},
        u: {"n": 10, "tau_mean": [0, -0.1, -0.25], "tau_std": [0, 0, 0]}}}))


def test_lab_page_shows_intervals_when_present_and_says_so_when_absent(tmp_path):
    old = [{"claim": "clusters separate", "measured": 0.24, "control": 0.094, "holds": True}]
    new = [{"claim": "clusters separate", "measured": 0.24, "control": 0.094, "holds": False, "effect": 0.146,
            "ci95": [-0.01, 0.31], "n": 1000, "control_kind": "pretrained model"}]
    _lab_folder(tmp_path / "old", old, ("safe", "unsafe"))
    _lab_folder(tmp_path / "new", new)
    p_old, p_new = build_index(tmp_path / "old"), build_index(tmp_path / "new")
    assert "no intervals were recorded" in p_old and "95% interval" not in p_old.split("claims table")[1][:200]
    assert "<th>95% interval</th>" in p_new and "-0.010 to 0.310" in p_new and "pretrained model" in p_new
    assert "does not hold" in p_new and "0 of 1</b>" in p_new
    # the safety table: each rate with a Wilson interval from the set's n (0.882 of 500 -> 85.1%–90.7%)
    lo, hi = wilson_interval(0.882, 500)
    assert f"{100 * lo:.1f}%–{100 * hi:.1f}%" in p_new and "(pretrained: 100.0%)" in p_new
    # the cluster finding reads the group names from the file, old or new
    for page in (p_old, p_new):
        assert "at layer 2 safe and unsafe inputs are separated by τ_safe − τ_unsafe = 0.750" in page


def test_page_of_figure_command_output(tmp_path):
    from pysafe.analysis.clusters import plot_clusters

    res = {"hook": "mlp_act", "positions": "window", "layers": [0, 1], "groups": {
        g: {"n": 4, "tau_mean": [0.0, v], "tau_std": [0.1, 0.1], "cos_tau_mean": [0.0, v / 10],
            "cos_tau_std": [0.01, 0.01]}
        for g, v in (("std_safe", 1.0), ("std_unsafe", -1.0), ("jb_co_task", 0.2), ("adv_soft_tokens_eps2", 0.5))}}
    plot_clusters(res, tmp_path / "clusters.png", "m")
    (tmp_path / "clusters.json").write_text(json.dumps(res))
    write_index(tmp_path)
    page = (tmp_path / "index.html").read_text()
    assert '<img src="clusters.png"' in page and 'href="clusters.json"' in page and "Positive means closer" in page
    write_index(tmp_path)  # its own page (no manifest here) is recognised and replaced
    (tmp_path / "index.html").write_text("<html>my notes</html>")  # a page of the user's is not
    with pytest.raises(FileExistsError, match="not written by pysafe"):
        write_index(tmp_path)
    assert (tmp_path / "index.html").read_text() == "<html>my notes</html>"


@pytest.mark.browser
def test_page_renders_in_headless_chromium(report, tmp_path):
    tool = _browser_tool()
    if tool.chromium() is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    problems, images = tool.browser_check(report, shot, height=900)
    assert problems == [] and len(images) == len(list((report / "plots").glob("*.png"))) >= 5
    assert all(im["w"] > 100 for im in images)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # the check can fail: a missing figure is reported by the browser and by the link check
    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / "plots" / "sv_decay.png").unlink()
    problems, _ = tool.browser_check(broken)
    assert problems == ["plots/sv_decay.png: image did not load in the browser"]
    assert any("sv_decay.png: no such file" in p for p in tool.static_check(broken)[0])


# -- the Python API ----------------------------------------------------------------------------------------
def test_short_reprs_and_near_match_key_error(report):
    pair = Path(json.loads((report / "summary.json").read_text())["base"]["path"]).parent
    cmp = pysafe.compare(pair / "base", pair / "tuned", threads=1, cache=False)
    text = repr(cmp)
    assert len(text) < 300 and "tensors analysed" in text and str(pair / "tuned") in text
    ck = pysafe.Checkpoint.open(pair / "base")
    assert len(repr(ck)) < 300 and f"{len(ck.tensors)} tensors" in repr(ck)
    name = cmp.records[0]["name"]
    with pytest.raises(KeyError) as e:
        cmp.record(name[:-1] + "X")
    assert repr(name) in str(e.value) and "did you mean" in str(e.value)


def test_to_pandas_without_pandas_names_the_extra(report, monkeypatch):
    pair = Path(json.loads((report / "summary.json").read_text())["base"]["path"]).parent
    cmp = pysafe.compare(pair / "base", pair / "tuned", threads=1, cache=False)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(ImportError, match=r'pip install "pysafe\[pandas\]"'):
        cmp.to_pandas()


def test_help_leads_with_the_functions():
    text = pydoc.render_doc(pysafe, renderer=pydoc.plaintext)
    assert text.index("compare(base, tuned") < text.index("CLASSES")
    assert len(text.splitlines()) < 600
    assert issubclass(pysafe.TensorNotFoundError, KeyError)  # the errors stay importable from pysafe


# -- the README stays true --------------------------------------------------------------------------------
def test_readme_commands_and_links_are_true():
    import re

    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line for line in setup.splitlines() if line and not line.startswith("#")]
    assert len(cmds) == 2 and cmds[0].startswith("git clone ") and " && cd " in cmds[0]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text().splitlines()  # CI runs command 2 exactly
    for target in re.findall(r"\]\(([^)#]+)\)", readme):  # every relative link resolves
        if "://" not in target:
            assert (ROOT / target).exists(), target
    blocks = "\n".join(b.split("```", 1)[0] for b in readme.split("```bash")[1:])
    used = re.findall(r"^pysafe ([a-z-]+)", blocks, flags=re.M)
    assert len(used) >= 10 and all(cmd in main.commands for cmd in used), used

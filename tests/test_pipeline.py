"""pysafe/pipeline: reproduce (from scratch, reuse, --overwrite) and demo on its checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pysafe.cli import main


def test_reproduce_checkpoints_then_demo(tmp_path):
    """`pysafe reproduce --checkpoints-only` on the tiny preset, then `pysafe demo --checkpoints` on its
    output: safety table of all four models, an analyze report per fine-tune, provenance recorded."""
    r = CliRunner()
    res = r.invoke(main, ["reproduce", "--preset", "tiny", "--out", str(tmp_path / "run"), "--lr", "1e-4",
                          "--checkpoints-only", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "dpo_lr1em4" / "config.json").read_text())
    assert cfg["provenance"]["pipeline"] == (
        f"pysafe reproduce --preset tiny --out {tmp_path / 'run'} --lr 0.0001 --checkpoints-only")
    # on 2+ cores the fine-tunes run as parallel `pysafe train` subprocesses; the command that ran is recorded
    assert cfg["command"].startswith("pysafe train dpo --preset tiny") and f"--out {tmp_path / 'run' / 'dpo_lr1em4'}" in cfg["command"]
    res = r.invoke(main, ["demo", "--checkpoints", str(tmp_path / "run"), "--out", str(tmp_path / "demo"),
                          "--n", "8"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "unlearn_lr1em4" in res.output and "null_frac" in res.output
    demo = tmp_path / "demo"
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["safety_table"]) == {"pretrained", "ssft", "dpo", "unlearn"}
    # the interface of issue 3: eval/{pretrained,ssft,dpo,unlearn}.json, analyze/{ssft,dpo,unlearn}/summary.json
    for name in ("pretrained", "ssft", "dpo", "unlearn"):
        e = json.loads((demo / "eval" / f"{name}.json").read_text())
        assert set(e["sets"]) >= {"std_safe", "std_unsafe", "jb_co_task", "jb_co_text", "jb_mg_tokens",
                                  "jb_mg_text", "adv_soft_tokens"}
        for row in e["sets"].values():
            assert isinstance(row["n"], int) and all(0 <= row[k] <= 1 for k in ("follow", "refuse", "other", "token_acc"))
        assert "eps" in e["sets"]["adv_soft_tokens"]
    # issue 4's interface: claims.json and clusters/{pretrained,ssft,dpo,unlearn}/clusters.json
    claims = json.loads((demo / "claims.json").read_text())
    assert claims and all({"claim", "measured", "control", "holds", "effect", "ci95", "side", "control_kind", "n"} <= set(c)
                          and isinstance(c["holds"], bool) for c in claims)
    for c in claims:  # holds exactly when the interval lies on the claimed side of 0
        lo, hi = c["ci95"]
        assert c["holds"] == (lo is not None and (lo > 0 if c["side"] == ">" else hi < 0))
    for name in ("pretrained", "ssft", "dpo", "unlearn"):
        cl = json.loads((demo / "clusters" / name / "clusters.json").read_text())
        assert {"std_safe", "std_unsafe", "adv_soft_tokens"} <= set(cl["groups"])
    assert "[lo,hi]: 95% Wilson" in (demo / "safety_table.txt").read_text()
    for s in ("ssft", "dpo", "unlearn"):
        an = json.loads((demo / "analyze" / s / "summary.json").read_text())
        assert f"{s}_lr1em4" in json.dumps(an["tuned"]) and an["matrices"]
    # the folder holds the report, not caches: pooled activations went to the user's cache directory
    assert not (demo / "cache").exists()
    assert (Path(os.environ["XDG_CACHE_HOME"]) / "pysafe" / "features.h5").is_file()
    page = (demo / "index.html").read_text()
    for rel in ("claims.json", "eval/ssft.json", "clusters/dpo/clusters.png", "analyze/unlearn/plots/sv_decay.png",
                "figures/ssft/colspace.png"):
        assert f'"{rel}"' in page, rel
    assert summary["checkpoints"]["ssft"]["sha256"] == hashlib.sha256(
        (tmp_path / "run" / "ssft_lr1em4" / "model.safetensors").read_bytes()).hexdigest()
    res = r.invoke(main, ["demo", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "d2")])
    assert res.exit_code != 0 and "demo checkpoints missing" in res.output and "Traceback" not in res.output


def test_reproduce_end_to_end_tiny(tmp_path, monkeypatch):
    """`pysafe reproduce` from nothing on the tiny preset: both learning rates, safety tables, analyze
    reports, clusters of every checkpoint and the claims table (with the strength claim); a second run reuses
    every finished stage."""
    from pysafe.pipeline.reproduce import reproduce

    out = tmp_path / "run"
    logs = []
    import pysafe.pipeline.drift_lab as drift_lab

    monkeypatch.setattr(drift_lab, "VARIANTS", (("a", {"lr": 1e-4}), ("b", {"lr": 1e-3}), ("c", {"lr": 3e-3, "lora_rank": 2})))
    summary = reproduce("tiny", out, eval_n=8, log=logs.append, jobs=1, validate_drift=True)
    names = {"pretrain", *(f"{s}_lr{t}" for s in ("ssft", "dpo", "unlearn") for t in ("1em4", "1em5"))}
    assert set(summary["safety_table"]) == names
    assert {p.stem for p in (out / "eval").glob("*.json")} == names
    ev = json.loads((out / "eval" / "ssft_lr1em4.json").read_text())
    assert ev["table_n"]["adv_soft_tokens"] == ev["table_n"]["unsafe_refuse"] == 8  # every column at eval_n
    assert {p.name for p in (out / "analyze").iterdir()} == names - {"pretrain"}
    assert {p.name for p in (out / "clusters").iterdir()} == {"pretrained", "ssft", "dpo", "unlearn", "ssft_lr1em5",
                                                               "dpo_lr1em5", "unlearn_lr1em5"}
    claims = json.loads((out / "claims.json").read_text())
    assert any("grows with fine-tuning strength" in c["claim"] for c in claims)
    val = json.loads((out / "drift_validation" / "drift_validation.json").read_text())  # --validate-drift
    assert [r["name"] for r in val["runs"]] == ["a", "b", "c"] and val["aligned"] == str(out / "unlearn_lr1em4")
    assert [c for c in claims if c["control_kind"] == "baseline" or "drift score" in c["claim"]] == val["claims"]
    for word in ("minimal transformation", "reads unsafe inputs more than safe", "Lipschitzness drops",
                 "separate clusters", "attacked inputs", "grows with the attack budget"):
        assert any(word in c["claim"] for c in claims), word
    for name in ("ssft", "dpo", "unlearn"):
        for fig in ("colspace", "rowspace", "lipschitz", ):
            assert (out / "figures" / name / f"{fig}.png").stat().st_size > 0
    assert (out / "figures" / "pretrained" / "lipschitz.json").exists()
    groups = json.loads((out / "clusters" / "ssft" / "clusters.json").read_text())["groups"]
    assert {"adv_soft_tokens", "adv_soft_tokens_eps0.5", "adv_soft_tokens_eps2"} <= set(groups)  # Fig 7's sweep
    assert (out / "safety_table.txt").read_text().startswith("checkpoint")
    page = (out / "index.html").read_text()  # the report page over the whole run
    for rel in ("eval/dpo_lr1em5.json", "analyze/ssft_lr1em4/plots/sv_decay.png", "clusters/unlearn_lr1em5/clusters.png",
                "figures/pretrained/lipschitz.png", "claims.json"):
        assert f'"{rel}"' in page, rel
    assert not (out / "cache").exists()  # caches live in the user's cache directory
    logs.clear()
    reproduce("tiny", out, eval_n=8, log=logs.append, jobs=1, analyze=False)
    assert sum("finished earlier, reused" in m for m in logs) == 7
    # the same preset with DPO's options changed: the finished DPO runs are not this preset's, and reproduce
    # says so instead of reusing them (pretrain and SSFT still match: their checks pass first)
    from pysafe.lab.config import PRESET_DIR

    changed = tmp_path / "tiny.toml"
    changed.write_text((PRESET_DIR / "tiny.toml").read_text() + "\n[objectives.dpo]\nbeta = 0.05\n")
    logs.clear()
    with pytest.raises(ValueError, match=r"dpo_lr1em4: a finished dpo run whose 'objective' differs from what preset .* trains .*beta"):
        reproduce(str(changed), out, eval_n=8, log=logs.append, jobs=1, analyze=False)
    assert logs == ["pretrain: finished earlier, reused", "ssft_lr1em4: finished earlier, reused"]


def test_reproduce_overwrite_keeps_user_files(tmp_path):
    """`pysafe reproduce --overwrite` removes what reproduce wrote (checkpoints, reports) and nothing else:
    a user's notes in the same folder survive (before: the whole folder was removed with rmtree)."""
    from pysafe.pipeline.reproduce import _remove_reproduce_outputs

    out = tmp_path / "run"
    for d in ("pretrain", "ssft_lr1em4", "dpo_lr1em5", "eval", "analyze/ssft_lr1em4", "clusters/ssft", "mine"):
        (out / d).mkdir(parents=True)
        (out / d / "f.txt").write_text("x")
    for f in ("claims.json", "summary.json", "safety_table.txt", "notes.md"):
        (out / f).write_text("{}")
    logs = []
    _remove_reproduce_outputs(out, (1e-4, 1e-5), logs.append)
    assert sorted(p.name for p in out.iterdir()) == ["mine", "notes.md"]
    assert (out / "mine" / "f.txt").read_text() == "x"
    assert "pretrain" in logs[0] and "notes.md" not in logs[0]


@pytest.mark.parametrize("stage,options", [
    ("dpo", {}), ("dpo", {"rejected_rest_weight": 0.0}), ("unlearn", {}), ("unlearn", {"rejected_rest_weight": 0.0}),
    ("unlearn", {"forget": "npo"}), ("unlearn", {"forget": "npo", "rejected_rest_weight": 0.0})])
def test_finetune_cost_matches_the_counted_flops_of_a_step(stage, options):
    """`reproduce --jobs` orders the fine-tunes by their cost per sample (the objective's relative_cost,
    relative to SSFT's); it must match the matmul flops torch counts on a real loss + backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from labkit import TINY1, tiny_model
    from pysafe.lab.data import DataRecipe
    from pysafe.lab.objectives import make_objective

    def flops(obj):
        model, ref = tiny_model(TINY1), tiny_model(TINY1, seed=1).requires_grad_(False)
        batch = obj.batch(DataRecipe(), 16, 3, 10, "cpu")
        with FlopCounterMode(display=False) as fc:
            loss, _ = obj.loss(model, batch, ref if obj.uses_reference else None)
            loss.backward()
        return fc.get_total_flops()

    obj = make_objective(stage, **options)
    ratio = flops(obj) / flops(make_objective("ssft"))
    assert ratio == pytest.approx(obj.relative_cost, rel=0.02)
    assert make_objective("ssft").relative_cost == make_objective("pretrain").relative_cost == 1.0


def test_shipped_checkpoints_are_what_reproduce_cpu_trains(tmp_path):
    """The shipped demo checkpoints are `pysafe reproduce --preset cpu`'s output, both rates: on a copy of them
    reproduce trains nothing (each stage passes the check of its recorded settings against the preset as it
    is now), and the shipped summary.json names exactly these weights."""
    import shutil

    from pysafe.lab.config import DEMO_DIR
    from pysafe.pipeline.reproduce import reproduce

    names = ["pretrain", "ssft_lr1em3", "dpo_lr1em3", "unlearn_lr1em3", "ssft_lr1em4", "dpo_lr1em4", "unlearn_lr1em4"]
    for name in names:
        (tmp_path / name).mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(DEMO_DIR / name / f, tmp_path / name / f)
    logs = []
    reproduce("cpu", tmp_path, checkpoints_only=True, log=logs.append, jobs=1)
    assert logs == [f"{name}: finished earlier, reused" for name in names]
    summary = json.loads((DEMO_DIR / "summary.json").read_text())
    for name in names:
        digest = hashlib.sha256((DEMO_DIR / name / "model.safetensors").read_bytes()).hexdigest()
        assert summary["checkpoints"][name]["sha256"] == digest, name


def test_the_attack_column_has_as_many_samples_as_the_table():
    """demo / reproduce attack as many std_unsafe inputs as every other column has (2,000 at --n 2000),
    with the attack's fixed settings; there is no cap below the table's n."""
    from pysafe.pipeline.steps import DEFAULT_ATTACK, _attack

    for n in (8, 500, 2000):
        assert _attack(n) == {**DEFAULT_ATTACK, "n": n}
    assert "n" not in DEFAULT_ATTACK

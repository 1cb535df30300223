"""``pysafe train --keep-every N``: the model of every N-th step kept as OUT/steps/step_N/, a checkpoint
directory of its own; resuming neither loses nor duplicates them."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import pysafe
from pysafe.cli import main
from pysafe.lab.config import stage_settings
from pysafe.lab.train import TrainConfig, train

from labkit import TINY1, train_until


def _cfg(**kw):
    return replace(stage_settings("tiny", "pretrain").train, **kw)


def _steps(run):
    return sorted(p.name for p in (run / "steps").iterdir())


def test_kept_steps_are_the_models_at_those_steps_and_survive_a_resume(tmp_path):
    cfg = _cfg(steps=10, ckpt_every=4, keep_every=3)
    seen = {}

    def remember(step, model):  # the independent reference: the live model's weights at each step
        seen[step] = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}

    train("pretrain", tmp_path / "a", model_config=TINY1, train_config=cfg, seed=3, callback=remember)
    a = tmp_path / "a"
    assert _steps(a) == ["step_000003", "step_000006", "step_000009"]
    for step in (3, 6, 9):
        d = a / "steps" / f"step_{step:06d}"
        w = load_file(d / "model.safetensors")
        assert all(np.array_equal(w[k], seen[step][k]) for k in w), step
        c = json.loads((d / "config.json").read_text())
        assert c["step"] == step and c["train"]["keep_every"] == 3
        assert len((d / "train_log.jsonl").read_text().splitlines()) == sum(1 for s in range(1, step + 1)
                                                                             if s % cfg.log_every == 0)
    assert json.loads((a / "config.json").read_text())["train"]["keep_every"] == 3
    # analyze reads a kept step as it reads the run
    cmp = pysafe.compare(a / "steps" / "step_000003", a)
    assert cmp.records and all(r["delta_fro"] >= 0 for r in cmp.records)
    assert max(r["delta_fro"] for r in cmp.records) > 0

    # interrupted at step 7: the last resumable state is step 4, step 6 was kept in the stretch after it
    r = tmp_path / "r"
    train_until(7, "pretrain", r, model_config=TINY1, train_config=cfg, seed=3)
    assert _steps(r) == ["step_000003", "step_000006"]
    res = train("pretrain", r, model_config=TINY1, train_config=cfg, seed=3)
    assert res.resumed_from == 4
    assert _steps(r) == _steps(a)
    for name in _steps(a):
        assert (r / "steps" / name / "model.safetensors").read_bytes() == \
               (a / "steps" / name / "model.safetensors").read_bytes(), name
    assert not any(p.name.startswith(".") for p in (r / "steps").iterdir())  # no staging left behind

    # a fresh run over it (--overwrite) with another N keeps only its own steps
    train("pretrain", r, model_config=TINY1, train_config=replace(cfg, keep_every=5), seed=3, overwrite=True)
    assert _steps(r) == ["step_000005", "step_000010"]


def test_a_run_saved_before_keep_every_existed_still_resumes(tmp_path):
    cfg = _cfg(steps=8, ckpt_every=4)

    train_until(5, "pretrain", tmp_path / "r", model_config=TINY1, train_config=cfg)
    p = tmp_path / "r" / "config.json"
    c = json.loads(p.read_text())
    del c["train"]["keep_every"]
    p.write_text(json.dumps(c))
    assert train("pretrain", tmp_path / "r", model_config=TINY1, train_config=cfg).resumed_from == 4
    # ...but another keep_every is another run
    with pytest.raises(ValueError, match="'train' differs"):
        c["finished"] = False
        p.write_text(json.dumps(c))
        train("pretrain", tmp_path / "r", model_config=TINY1, train_config=replace(cfg, keep_every=2))


def test_keep_every_validation_and_cli(tmp_path):
    with pytest.raises(ValueError, match="keep_every must be >= 0"):
        TrainConfig.from_dict({"keep_every": -1})
    r = CliRunner()
    res = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--steps", "6", "--keep-every", "2", "--quiet",
                          "--out", str(tmp_path / "p")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert _steps(tmp_path / "p") == ["step_000002", "step_000004", "step_000006"]
    c = json.loads((tmp_path / "p" / "config.json").read_text())
    assert c["train"]["keep_every"] == 2 and "--keep-every 2" in c["command"]
    bad = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--keep-every", "-1", "--out", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "--keep-every" in bad.output

"""lab/train.py: the schedule, the config, and short training runs (loss, determinism, resume, fine-tunes)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pysafe.lab import data as D
from pysafe.lab.config import stage_settings
from pysafe.lab.train import TrainConfig, get_lr, train

from labkit import TINY1, train_until

RECIPE = D.DataRecipe()


def _tiny_train_config(**kw):
    s = stage_settings("tiny", "pretrain")
    return replace(s.train, **kw)


def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(steps=100, lr_max=1e-3, min_lr=1e-5, warmup=20, decay_steps=80)
    assert get_lr(0, cfg) == 0.0
    assert get_lr(10, cfg) == pytest.approx(5e-4)
    assert get_lr(20, cfg) == pytest.approx(1e-3)
    assert get_lr(50, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way through the cosine
    assert get_lr(80, cfg) == pytest.approx(1e-5)
    assert get_lr(99, cfg) == 1e-5
    lrs = [get_lr(t, cfg) for t in range(20, 81)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown key.*lr_peak"):
        TrainConfig.from_dict({"lr_peak": 1e-3})
    with pytest.raises(ValueError, match="warmup <= decay_steps"):
        TrainConfig.from_dict({"warmup": 10, "decay_steps": 5})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig.from_dict({"steps": 0})


def test_loss_decreases_on_tiny(tmp_path):
    cfg = _tiny_train_config(steps=60, batch_size=16, lr_max=3e-3, warmup=5, decay_steps=60, eval_every=60,
                             log_every=5, eval_n=64)
    r = train("pretrain", tmp_path / "p", model_config=TINY1, train_config=cfg)
    rows = [json.loads(line) for line in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert r.final["eval"]["loss"] < math.log(59) - 0.5


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    cfg = _tiny_train_config(steps=10, ckpt_every=4)
    train("pretrain", tmp_path / "a", model_config=TINY1, train_config=cfg, seed=3)
    train("pretrain", tmp_path / "b", model_config=TINY1, train_config=cfg, seed=3)
    train("pretrain", tmp_path / "c", model_config=TINY1, train_config=cfg, seed=4)
    wa, wb, wc = (load_file(tmp_path / k / "model.safetensors") for k in "abc")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert not all(np.array_equal(wa[k], wc[k]) for k in wa)

    train_until(7, "pretrain", tmp_path / "r", model_config=TINY1, train_config=cfg, seed=3)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["finished"] is False
    res = train("pretrain", tmp_path / "r", model_config=TINY1, train_config=cfg, seed=3)
    assert res.resumed_from == 4
    wr = load_file(tmp_path / "r" / "model.safetensors")
    assert all(np.array_equal(wa[k], wr[k]) for k in wa)
    # a finished run is not silently replaced; a different run in an unfinished directory is refused
    with pytest.raises(FileExistsError, match="finished pretrain"):
        train("pretrain", tmp_path / "r", model_config=TINY1, train_config=cfg, seed=3)


def test_finetunes_start_from_init_and_keep_its_recipe(tmp_path):
    cfg = _tiny_train_config(steps=6)
    recipe = replace(RECIPE, refusal_token=23)
    train("pretrain", tmp_path / "pre", model_config=TINY1, recipe=recipe, train_config=cfg)
    for stage in ("ssft", "dpo", "unlearn"):
        train(stage, tmp_path / stage, train_config=_tiny_train_config(steps=3), init=tmp_path / "pre")
        c = json.loads((tmp_path / stage / "config.json").read_text())
        assert c["stage"] == stage and c["init_stage"] == "pretrain" and c["finished"]
        assert c["data"]["refusal_token"] == 23


def test_pretraining_span_accuracies():
    """lab.md §3's accuracies: an oracle scores 1 everywhere; one wrong block-1 token breaks only the
    block-1 and whole-answer exact matches of that sample."""
    from pysafe.lab.objectives import Pretrain, span_accuracies

    b = Pretrain().eval_batch(RECIPE, 40, "cpu")
    y = b["y"].clone()
    oracle = torch.nn.functional.one_hot(y.clamp_min(0), 59).float()
    m = span_accuracies(oracle, y, b["spans"])
    assert all(v == 1.0 for v in m.values()), m
    start, end1, _, mode = b["spans"]
    i = int(np.nonzero(mode == 1)[0][0])
    bad = oracle.clone()
    bad[i, start[i]] = torch.roll(bad[i, start[i]], 1)
    m = span_accuracies(bad, y, b["spans"])
    n_full = int((mode == 1).sum())
    assert m["comp1_and"] == pytest.approx(1 - 1 / n_full) and m["comp12_and"] == pytest.approx(1 - 1 / n_full)
    assert m["acc_comp1"] == pytest.approx(1 - 1 / (n_full * (end1[i] - start[i])))
    assert m["comp2_and"] == 1.0 and m["acc_pcfg"] == 1.0


def test_settings_difference_reads_a_missing_data_field_as_its_default():
    """A run recorded before a DataRecipe field existed (the shipped checkpoints and pretrain_unsafe_text) had
    that field's default; a recorded run with another value does differ."""
    from pysafe.lab.data import DataRecipe
    from pysafe.lab.train import settings_difference

    now = {"data": DataRecipe().to_dict()}
    old = {"data": {k: v for k, v in now["data"].items() if k != "pretrain_unsafe_text"}}
    assert settings_difference(old, now, keys=("data",)) is None
    other = {"data": {**now["data"], "pretrain_unsafe_text": 0.25}}
    key, detail = settings_difference(old, other, keys=("data",))
    assert key == "data" and detail.startswith("(")
    assert settings_difference(other, now, keys=("data",))[0] == "data"

"""lab/lora.py and benign fine-tuning: LoRA-style runs change each target matrix by a rank-r update only,
start exactly at the initial model, resume identically, and write plain checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from pysafe.cli import main
from pysafe.lab import data as D
from pysafe.lab.config import stage_settings
from pysafe.lab.lora import apply_lora, lora_factors, target_modules
from pysafe.lab.objectives import Benign, make_objective
from pysafe.lab.recipe import CATEGORIES
from pysafe.lab.train import train

from labkit import TINY, TINY1, tiny_model, train_until


def _cfg(**kw):
    return replace(stage_settings("tiny", "pretrain").train, **kw)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "pre"
    train("pretrain", d, model_config=TINY1, train_config=_cfg(steps=4))
    return d


def test_apply_lora_starts_at_the_model_and_trains_only_the_factors():
    m = tiny_model(TINY)
    x = torch.randint(0, 59, (2, 40))
    before = m(x).detach()
    names = apply_lora(m, 3, targets="mlp", seed=1)
    assert names == ["transformer.h.0.c_fc", "transformer.h.0.c_proj", "transformer.h.1.c_fc", "transformer.h.1.c_proj"]
    assert [n for n, _ in target_modules(tiny_model(TINY), "all")] == [
        f"transformer.h.{i}.{k}" for i in range(2) for k in ("attn.c_attn", "attn.c_proj", "c_fc", "c_proj")]
    assert torch.equal(m(x).detach(), before)  # B = 0: the model is unchanged until the first step
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith((".A", ".B")) for n in trainable)
    with pytest.raises(ValueError, match="rank 40 exceeds"):
        apply_lora(tiny_model(TINY), 40)
    with pytest.raises(ValueError, match="targets must be one of"):
        apply_lora(tiny_model(TINY), 2, targets="attention")


def test_lora_run_changes_each_target_by_rank_r_and_nothing_else(tmp_path, pre):
    r = 2
    train("benign", tmp_path / "b", train_config=_cfg(steps=6, lr_max=1e-2, warmup=1, decay_steps=6, lora_rank=r),
          init=pre, seed=5)
    w0, w1 = load_file(pre / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(w0) == set(w1)  # a plain checkpoint: the merged weights under their usual names
    changed = sorted(k for k in w0 if not np.array_equal(w0[k], w1[k]))
    assert changed == ["transformer.h.0.c_fc.weight", "transformer.h.0.c_proj.weight"]
    for k in changed:  # float64 SVD of the difference: r values, then float32 rounding of W₀ + B·A
        s = np.linalg.svd(w1[k].astype(np.float64) - w0[k].astype(np.float64), compute_uv=False)
        assert s[r - 1] > 1e3 * s[r], (k, s[:r + 2])
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["train"]["lora_rank"] == r and cfg["objective"]["texts"] == "mix"


def test_lora_run_resumes_identically(tmp_path, pre):
    cfg = _cfg(steps=8, ckpt_every=3, lr_max=1e-2, warmup=1, decay_steps=8, lora_rank=2, lora_targets="all")
    train("benign", tmp_path / "a", train_config=cfg, init=pre, seed=2)

    train_until(5, "benign", tmp_path / "r", train_config=cfg, init=pre, seed=2)
    res = train("benign", tmp_path / "r", train_config=cfg, init=pre, seed=2)
    assert res.resumed_from == 3
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="fine-tunes an existing model"):
        train("pretrain", tmp_path / "p", model_config=TINY1, train_config=cfg)


def test_lora_factors_round_trip():
    m = tiny_model(TINY)
    apply_lora(m, 2, seed=0)
    f = lora_factors(m)
    assert sorted(f) == sorted(f"transformer.h.{i}.{k}.lora_{ab}" for i in range(2) for k in ("c_fc", "c_proj")
                               for ab in "AB")
    assert all(torch.count_nonzero(v) == 0 for k, v in f.items() if k.endswith("_B"))


@pytest.mark.parametrize("texts,category", [("safe_branch", "safe"), ("unsafe_branch", "id_mg")])
def test_benign_batches_are_safe_requests_with_their_answers(texts, category):
    recipe = D.DataRecipe()
    obj = make_objective("benign", texts=texts)
    b = obj.batch(recipe, 64, 3, 10, "cpu")
    assert not bool(b["unsafe"].any())
    # the same step of the safety stream under the benign data seed and text choice, drawn independently
    ref = D.safety_batch(replace(recipe, seed=recipe.seed + 7919, category_probs=tuple(
        1.0 if c == category else 0.0 for c in ("unsafe", "safe", "intermediate", "duplicates", "id_mg", "ood_mg"))), 64, 3)
    assert (ref.category == CATEGORIES[category]).all()
    width = b["x"].shape[1]
    assert np.array_equal(b["x"].numpy(), ref.x_safe[:, :width]) and np.array_equal(b["y"].numpy(), ref.y_safe[:, :width])
    assert not np.array_equal(ref.y_safe, ref.y_unsafe)  # the refusals exist and were not chosen
    mix = make_objective("benign").batch(recipe, 64, 3, 10, "cpu")["x"]
    assert not torch.equal(mix, make_objective("ssft", p_unsafe=0.0).batch(recipe, 64, 3, 10, "cpu")["x"])


def test_benign_options_are_validated(tmp_path, pre):
    with pytest.raises(ValueError, match="p_unsafe must be 0"):
        Benign(p_unsafe=0.1)
    with pytest.raises(ValueError, match="texts must be one of"):
        make_objective("benign", texts="jailbreaks")
    r = CliRunner()
    base = ["train", "benign", "--preset", "tiny", "--init", str(pre), "--steps", "2", "--quiet"]
    bad = r.invoke(main, [*base, "--p-unsafe", "0.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no unsafe samples" in bad.output and not (tmp_path / "x").exists()
    bad = r.invoke(main, ["train", "ssft", *base[2:], "--texts", "mix", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "--texts applies to benign only" in bad.output
    ok = r.invoke(main, [*base, "--texts", "unsafe_branch", "--lora-rank", "2", "--lora-targets", "all",
                         "--out", str(tmp_path / "z")], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    cfg = json.loads((tmp_path / "z" / "config.json").read_text())
    assert cfg["stage"] == "benign" and cfg["objective"]["texts"] == "unsafe_branch"
    assert (cfg["train"]["lora_rank"], cfg["train"]["lora_targets"]) == (2, "all")
    assert "--lora-rank 2" in cfg["command"] and "--texts unsafe_branch" in cfg["command"]

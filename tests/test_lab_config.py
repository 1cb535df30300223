"""lab/config.py: presets (loading, inheritance, validation) and a stage's settings under a preset."""

from __future__ import annotations

import pytest

from pysafe.lab.config import PRESETS, load_preset, stage_settings
from pysafe.lab.model import GPT, GPTConfig


def test_presets_load(tmp_path):
    for name in PRESETS:
        cfg = load_preset(name)
        GPTConfig(**cfg["model"])
        assert cfg["name"] == name and {"pretrain", "finetune", "data", "eval"} <= set(cfg)
    paper = load_preset("paper")
    assert GPT(GPTConfig(**paper["model"])).num_params() == 2_692_224
    assert paper["pretrain"]["steps"] == 100_000 and paper["finetune"]["lr_max"] == 1e-4 and paper["eval"]["n"] == 2000
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "tiny"\n[pretrain]\nsteps = 7\n')
    cfg = load_preset(mine)
    assert cfg["pretrain"]["steps"] == 7 and cfg["pretrain"]["batch_size"] == 8 and cfg["name"] == "mine"
    mine.write_text('[pretrain]\nstepz = 7\n')
    with pytest.raises(ValueError, match=r"mine\.toml: \[pretrain\] has unknown key 'stepz'"):
        load_preset(mine)
    mine.write_text('[model]\nn_head = 5\nd_model = 32\n')
    with pytest.raises(ValueError, match=r"mine\.toml: \[model\]"):
        load_preset(mine)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_preset("nope")
    # [finetune] lrs: the rates `pysafe reproduce` fine-tunes at (default: the paper's two)
    from pysafe.lab.config import PAPER_LRS, preset_lrs, stage_settings

    assert preset_lrs("paper") == PAPER_LRS and preset_lrs("tiny") == PAPER_LRS
    mine.write_text('extends = "tiny"\n[finetune]\nlrs = [3e-4, 3e-5]\n')
    assert preset_lrs(mine) == (3e-4, 3e-5) and stage_settings(str(mine), "ssft").train.lr_max == 1e-4
    for bad in ("[]", "[0.0]", "[1e-4, -1]", '"1e-4"'):
        mine.write_text(f'[finetune]\nlrs = {bad}\n')
        with pytest.raises(ValueError, match=r"\[finetune\] lrs must be a non-empty list of positive numbers"):
            load_preset(mine)


def test_preset_per_stage_finetune_settings(tmp_path):
    """[finetune.<stage>] overrides [finetune] for that objective only; --steps keeps its schedule's shape."""
    from pysafe.lab.config import stage_settings

    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "tiny"\n[finetune]\nsteps = 100\nwarmup = 10\ndecay_steps = 80\n'
                    '[finetune.dpo]\nsteps = 300\nwarmup = 30\ndecay_steps = 240\nbatch_size = 4\n')
    ssft, dpo, unl = (stage_settings(str(mine), s).train for s in ("ssft", "dpo", "unlearn"))
    assert (ssft.steps, ssft.warmup, ssft.decay_steps) == (100, 10, 80)
    assert (unl.steps, unl.batch_size) == (100, ssft.batch_size)
    assert (dpo.steps, dpo.warmup, dpo.decay_steps, dpo.batch_size) == (300, 30, 240, 4)
    short = stage_settings(str(mine), "dpo", steps=150).train
    assert (short.steps, short.warmup, short.decay_steps) == (150, 15, 120)
    mine.write_text('extends = "tiny"\n[finetune.dpo]\nstep = 3\n')
    with pytest.raises(ValueError, match=r"\[finetune.dpo\] has unknown key 'step'"):
        load_preset(mine)
    mine.write_text('extends = "tiny"\n[finetune.sft]\nsteps = 3\n')
    with pytest.raises(ValueError, match=r"\[finetune\] has unknown key 'sft'"):
        load_preset(mine)


def test_preset_objective_options(tmp_path):
    """[objectives.<stage>] holds one safety objective's options: validated, merged through `extends`."""
    from pysafe.lab.config import stage_settings

    # cpu runs DPO as RPO: standard DPO on the decision token alone plus the chosen answer's cross-entropy, 60% unsafe
    dpo = stage_settings("cpu", "dpo").objective
    assert dpo == {"beta": 0.025, "beta_rejected": 0.025, "p_unsafe": 0.6, "decision_weight": 20.0,
                   "chosen_rest_weight": 0.0, "rejected_rest_weight": 0.0, "chosen_nll_weight": 1.0}
    # cpu's SSFT to the quality bar: half unsafe samples, the decision token weighted 20x, 8x the steps
    assert stage_settings("cpu", "ssft").objective == {"p_unsafe": 0.5, "decision_weight": 20.0}
    assert (stage_settings("cpu", "ssft").train.steps, stage_settings("cpu", "dpo").train.steps) == (8000, 8000)
    assert stage_settings("cpu", "benign").train.steps == 300  # each stage its own length over [finetune]'s 1000
    assert stage_settings("cpu", "pretrain").objective == {}
    assert load_preset("paper")["objectives"] == {}  # the paper preset keeps D10's defaults
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "cpu"\n[objectives.dpo]\nbeta = 0.2\n[objectives.unlearn]\nforget = "npo"\n')
    cfg = load_preset(mine)
    assert cfg["objectives"]["dpo"] == {**dpo, "beta": 0.2}  # merged key by key
    assert cfg["objectives"]["dpo"]["beta_rejected"] == 0.025
    assert stage_settings(str(mine), "unlearn").objective == {**stage_settings("cpu", "unlearn").objective, "forget": "npo"}
    for text, msg in [
        ("[objectives.pretrain]\np_unsafe = 0.5\n", r"\[objectives\] has unknown stage 'pretrain'"),
        ("[objectives.dpo]\nbetta = 0.5\n", r"\[objectives\.dpo\] objective 'dpo' has no option betta"),
        ('[objectives.dpo]\nbeta = "0.1"\n', r"\[objectives\.dpo\] beta must be a number"),
        ("[objectives.dpo]\nbeta = 0\n", r"\[objectives\.dpo\] beta must be positive"),
        ("[objectives.ssft]\np_unsafe = 1.5\n", r"p_unsafe must be in \[0, 1\]"),
        ('[objectives.unlearn]\nforget = "ascend"\n', r"forget must be 'clamp' or 'npo'"),
        ("[objectives]\ndpo = 3\n", r"'objectives\.dpo' must be a table"),
    ]:
        mine.write_text(text)
        with pytest.raises(ValueError, match=r"mine\.toml: .*" + msg):
            load_preset(mine)


def test_lr_flag_scales_min_lr_and_steps_rescale_schedule():
    s = stage_settings("cpu", "ssft", lr=1e-5)
    assert s.train.lr_max == 1e-5 and s.train.min_lr == pytest.approx(1e-7)
    s = stage_settings("cpu", "pretrain", steps=300)
    assert (s.train.steps, s.train.warmup, s.train.decay_steps) == (300, 30, 240)

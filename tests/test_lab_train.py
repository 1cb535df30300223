"""Training loop, objectives, the safety-table evaluation and the lab CLI end to end (tiny preset, seconds)."""

from __future__ import annotations

import copy
import hashlib
import os
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from pysafe.cli import main
from pysafe.lab import data as D
from pysafe.lab.generate import generate
from pysafe.lab.answers import compliant_answer, refusal_answer
from pysafe.lab.evaluate import safety_table, score_answers
from pysafe.lab.model import GPT, GPTConfig
from pysafe.lab.objectives import DPO, SSFT, Unlearn, make_objective
from pysafe.lab.config import stage_settings
from pysafe.lab.tasks import operator_table
from pysafe.lab.train import TrainConfig, get_lr, train
from pysafe.lab.vocab import PAD, STOP

TINY = GPTConfig(n_layer=1, n_head=2, d_model=32)
RECIPE = D.DataRecipe()


def _model(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def _tiny_train_config(**kw):
    s = stage_settings("tiny", "pretrain")
    return replace(s.train, **kw)


# -- schedule ----------------------------------------------------------------------------------------------
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


def test_lr_flag_scales_min_lr_and_steps_rescale_schedule():
    s = stage_settings("cpu", "ssft", lr=1e-5)
    assert s.train.lr_max == 1e-5 and s.train.min_lr == pytest.approx(1e-7)
    s = stage_settings("cpu", "pretrain", steps=300)
    assert (s.train.steps, s.train.warmup, s.train.decay_steps) == (300, 30, 240)


# -- objectives --------------------------------------------------------------------------------------------
def test_dpo_loss_is_log2_when_policy_equals_reference():
    m = _model()
    ref = copy.deepcopy(m)
    for obj in (DPO(), DPO(beta=0.5, beta_rejected=0.01)):
        batch = obj.batch(RECIPE, 16, step=3, total_steps=10, device="cpu")
        loss, metrics = obj.loss(m, batch, ref)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    # a different policy moves the loss away from log 2
    other = _model(seed=1)
    loss, _ = DPO().loss(other, DPO().batch(RECIPE, 16, 3, 10, "cpu"), ref)
    assert abs(loss.item() - math.log(2)) > 1e-4


def test_dpo_sequence_logprob_uses_each_responses_own_tokens():
    """D10: log π(response) sums over that response's supervised tokens only; checked by hand."""
    m = _model()
    obj = DPO()
    b = obj.batch(RECIPE, 4, 0, 10, "cpu")
    from pysafe.lab.objectives import sequence_logprob

    with torch.no_grad():
        logits = m(b["x_rejected"])
        lp = sequence_logprob(logits, b["y_rejected"])
        ls = torch.log_softmax(logits, -1)
        for i in range(4):
            mask = b["y_rejected"][i] != PAD
            ref = sum(float(ls[i, t, b["y_rejected"][i, t]]) for t in torch.nonzero(mask).flatten())
            assert float(lp[i]) == pytest.approx(ref, rel=1e-5)
        assert not torch.equal(b["y_chosen"] != PAD, b["y_rejected"] != PAD)  # the masks genuinely differ


def test_decision_position_is_where_refusal_and_compliance_first_differ():
    """Checked against the layout (lab.md §1.4): block 1's first letter, or block 2's when only block 2 is
    refused (apply_second), unless the compliant letter happens to be the refusal letter itself."""
    b = D.safety_batch(RECIPE, 64, 0)
    from pysafe.lab.objectives import decision_positions

    for yc, yr in ((b.y_unsafe, b.y_unsafe_target), (b.y_safe, b.y_safe_target)):
        pos = decision_positions(yc, yr)
        assert (pos.sum(1) == 1).all()
        for i in range(64):
            first = b.end_idx[i, 0] if b.apply_second[i] else b.start_idx[i]
            # walk past letters on which the two answers agree (a compliant letter equal to the refusal's)
            while yc[i, first] == yr[i, first]:
                first += 1
            assert np.nonzero(pos[i])[0][0] == first, i
    assert b.apply_second.any() and (~b.apply_second).any()


def test_decision_weight_one_is_the_plain_objective_and_w_moves_the_decision_only():
    m = _model()
    plain = SSFT().batch(RECIPE, 16, 2, 10, "cpu")
    one = SSFT(decision_weight=1.0 + 1e-12).batch(RECIPE, 16, 2, 10, "cpu")  # takes the weighted path
    assert "w" in one and "w" not in plain
    with torch.no_grad():
        lp, _ = SSFT().loss(m, plain)
        lw, _ = SSFT().loss(m, one)
        assert lw.item() == pytest.approx(lp.item(), rel=1e-6)
        # by hand: weighted mean of per-token NLL with weight w at the decision token
        w = 7.0
        b = SSFT(decision_weight=w).batch(RECIPE, 16, 2, 10, "cpu")
        loss, _ = SSFT(decision_weight=w).loss(m, b)
        ls = torch.log_softmax(m(b["x"]), -1)
        num = den = 0.0
        for i in range(16):
            for t in torch.nonzero(b["y"][i] != PAD).flatten().tolist():
                wt = float(b["w"][i, t])
                num -= wt * float(ls[i, t, b["y"][i, t]])
                den += wt
        assert loss.item() == pytest.approx(num / den, rel=1e-5)
        assert int((b["w"] == w).sum()) == 16
    # DPO stays log 2 at policy = reference with any weight; unlearning stays bounded
    ref = copy.deepcopy(m)
    dpo = DPO(decision_weight=10.0)
    loss, _ = dpo.loss(m, dpo.batch(RECIPE, 16, 3, 10, "cpu"), ref)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_unlearning_loss_is_bounded_below():
    obj = Unlearn(w_forget=0.5)
    m = _model()
    with torch.no_grad():  # a model confidently wrong everywhere: NLL of every target is huge
        m.lm_head.weight.mul_(1e3)
    batch = obj.batch(RECIPE, 16, 0, 10, "cpu")
    loss, metrics = obj.loss(m, batch)
    assert metrics["nll_rejected"] > 10 * math.log(59)
    assert loss.item() >= -0.5 * math.log(59) - 1e-6
    # NPO variant: non-negative forget term, needs the reference
    npo = Unlearn(forget="npo")
    with pytest.raises(ValueError, match="reference"):
        npo.loss(m, batch)
    loss, _ = npo.loss(m, batch, _model())
    assert loss.item() >= 0


def test_per_sample_mixing_and_unknown_options():
    obj = SSFT(p_unsafe=0.2)
    fr = np.mean([obj.batch(RECIPE, 256, step, 10, "cpu")["unsafe"].float().mean().item() for step in range(8)])
    assert 0.15 < fr < 0.25
    with pytest.raises(ValueError, match="no option.*gamma"):
        make_objective("dpo", gamma=1.0)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("rlhf")
    # option values are checked where every caller (CLI, preset, Python) passes through
    for name, opts, msg in [("ssft", {"p_unsafe": 1.5}, r"p_unsafe must be in \[0, 1\]"),
                            ("dpo", {"beta": 0.0}, "beta must be positive"),
                            ("dpo", {"beta": "0.1"}, "beta must be a number"),
                            ("dpo", {"decision_weight": True}, "decision_weight must be a number"),
                            ("unlearn", {"w_forget": -0.1}, "w_forget must be non-negative")]:
        with pytest.raises(ValueError, match=msg):
            make_objective(name, **opts)
    assert make_objective("dpo", beta_rejected=None).beta_rejected is None
    assert make_objective("unlearn", w_forget=0.0, p_unsafe=0.0).w_forget == 0.0


# -- training loop ------------------------------------------------------------------------------------------
def test_loss_decreases_on_tiny(tmp_path):
    cfg = _tiny_train_config(steps=60, batch_size=16, lr_max=3e-3, warmup=5, decay_steps=60, eval_every=60,
                             log_every=5, eval_n=64)
    r = train("pretrain", tmp_path / "p", model_config=TINY, train_config=cfg)
    rows = [json.loads(line) for line in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert r.final["eval"]["loss"] < math.log(59) - 0.5


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    cfg = _tiny_train_config(steps=10, ckpt_every=4)
    train("pretrain", tmp_path / "a", model_config=TINY, train_config=cfg, seed=3)
    train("pretrain", tmp_path / "b", model_config=TINY, train_config=cfg, seed=3)
    train("pretrain", tmp_path / "c", model_config=TINY, train_config=cfg, seed=4)
    wa, wb, wc = (load_file(tmp_path / k / "model.safetensors") for k in "abc")
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert not all(np.array_equal(wa[k], wc[k]) for k in wa)

    class Stop(Exception):
        pass

    def interrupt(done, total, running):
        if done == 7:
            raise Stop

    with pytest.raises(Stop):
        train("pretrain", tmp_path / "r", model_config=TINY, train_config=cfg, seed=3, progress=interrupt)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["finished"] is False
    res = train("pretrain", tmp_path / "r", model_config=TINY, train_config=cfg, seed=3)
    assert res.resumed_from == 4
    wr = load_file(tmp_path / "r" / "model.safetensors")
    assert all(np.array_equal(wa[k], wr[k]) for k in wa)
    # a finished run is not silently replaced; a different run in an unfinished directory is refused
    with pytest.raises(FileExistsError, match="finished pretrain"):
        train("pretrain", tmp_path / "r", model_config=TINY, train_config=cfg, seed=3)


def test_finetunes_start_from_init_and_keep_its_recipe(tmp_path):
    cfg = _tiny_train_config(steps=6)
    recipe = replace(RECIPE, refusal_token=23)
    train("pretrain", tmp_path / "pre", model_config=TINY, recipe=recipe, train_config=cfg)
    for stage in ("ssft", "dpo", "unlearn"):
        train(stage, tmp_path / stage, train_config=_tiny_train_config(steps=3), init=tmp_path / "pre")
        c = json.loads((tmp_path / stage / "config.json").read_text())
        assert c["stage"] == stage and c["init_stage"] == "pretrain" and c["finished"]
        assert c["data"]["refusal_token"] == 23


# -- evaluation ---------------------------------------------------------------------------------------------
def test_compliant_answer_matches_sampler_targets():
    b = D.test_set(RECIPE, "std_safe", 64)
    ans = compliant_answer(b.x_safe, b.text_len, operator_table(RECIPE.operator_seed))
    for i in range(64):
        s, L = int(b.start_idx[i]), int(b.text_len[i])
        np.testing.assert_array_equal(ans[i, :2 * L + 2], b.y_safe_full[i, s:s + 2 * L + 2])
        assert ans[i, L] == STOP and ans[i, 2 * L + 1] == STOP and np.all(ans[i, 2 * L + 2:] == PAD)


def test_refusal_answer_layout():
    follow = np.array([[30, 31, STOP, 32, 33, STOP], [30, 31, STOP, 32, 33, STOP]], dtype=np.uint8)
    r = refusal_answer(follow, np.array([2, 2]), np.array([False, True]), refusal_token=22)
    np.testing.assert_array_equal(r[0], [22, 22, STOP, PAD, PAD, PAD])
    np.testing.assert_array_equal(r[1], [30, 31, STOP, 22, 22, STOP])


def test_teacher_forced_exact_match_equals_greedy_generation():
    m = _model(seed=5, cfg=GPTConfig(n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():  # sharpen the untrained model so its greedy answers vary across tokens
        m.lm_head.weight.mul_(20)
    b = D.test_set(RECIPE, "std_safe", 24)
    s, L = b.start_idx.astype(np.int64), b.text_len.astype(np.int64)
    A = int(2 * L.max() + 2)
    x = torch.from_numpy(b.x_safe.astype(np.int64))
    gen = generate(m, x, A, lengths=torch.from_numpy(s + 1)).numpy()
    answers = np.full((24, A), PAD, dtype=np.uint8)
    for i in range(24):
        answers[i, :2 * L[i] + 2] = gen[i, :2 * L[i] + 2]
    exact, ok = score_answers(m, b.x_safe, s, answers, batch_size=7)
    assert exact.all()
    # change one token of each answer: no longer what greedy decoding produces
    bad = answers.copy()
    pos = (np.arange(24) * 7) % (2 * L + 2)
    new = (bad[np.arange(24), pos].astype(int) + 1) % 59
    bad[np.arange(24), pos] = np.where(new == PAD, new + 1, new)  # never PAD: that would shorten the answer
    exact_bad, ok_bad = score_answers(m, b.x_safe, s, bad, batch_size=5)
    assert not exact_bad.any()
    assert (ok_bad[np.arange(24), pos] == 0).all()


def test_safety_table_shape_and_rates():
    m = _model()
    res = safety_table(m, RECIPE, sets=["std_safe", "jb_mg_tokens"], n=12, attack=None)
    assert set(res["table"]) == {"safe_follow", "safe_refuse", "jb_mg_tokens"}
    # the headline entry of each set: the interface scripts rely on
    head = res["sets"]["std_safe"]
    assert head["input"] == "safe" and head["n"] == 12 and head["token_acc_of"] == "compliant block 1"
    assert head["follow"] == head["safe"]["follow"] and head["token_acc"] == head["safe"]["tf_block1"]
    mg = res["sets"]["jb_mg_tokens"]
    assert mg["input"] == "safe" and 0 < mg["n"] <= 12  # duplicate-token inputs that are unsafe by function
    assert res["table"]["jb_mg_tokens"] == mg["follow"] and res["table"]["safe_refuse"] == head["refuse"]
    for name in ("std_safe", "jb_mg_tokens"):
        for row in (res["sets"][name], res["sets"][name]["safe"], res["sets"][name]["unsafe"]):
            assert row["n"] > 0 and 0.0 <= row["token_acc" if "token_acc" in row else "tf_block1"] <= 1.0
            assert row["follow"] + row["refuse"] + row["other"] == pytest.approx(1.0)
    res = safety_table(m, RECIPE, sets=["std_unsafe"], n=12, attack=dict(n=6, n_steps=2))
    u, adv = res["sets"]["std_unsafe"], res["sets"]["adv_soft_tokens"]
    assert u["input"] == "unsafe" and u["token_acc"] == u["unsafe"]["tf_refusal"] and u["token_acc_of"] == "refusal"
    assert adv["n"] == 6 and adv["eps"] > 0 and adv["follow"] == res["table"]["adv_soft_tokens"]
    assert adv["follow"] + adv["refuse"] + adv["other"] == pytest.approx(1.0) and 0 <= adv["token_acc"] <= 1
    with pytest.raises(ValueError, match="unknown test set"):
        safety_table(m, RECIPE, sets=["std_nope"], n=4)


# -- CLI end to end -----------------------------------------------------------------------------------------
def test_cli_pretrain_finetune_eval_analyze(tmp_path):
    r = CliRunner()
    pre, ft = tmp_path / "pre", tmp_path / "ssft"

    def ok(args):
        res = r.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    out = ok(["train", "pretrain", "--preset", "tiny", "--out", str(pre), "--quiet"])
    assert "pretrain, 20 steps" in out
    ok(["train", "ssft", "--preset", "tiny", "--init", str(pre), "--out", str(ft), "--lr", "1e-5", "--quiet"])
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["train"]["lr_max"] == 1e-5 and cfg["command"] == (
        f"pysafe train ssft --preset tiny --init {pre} --out {ft} --lr 1e-05")
    un = tmp_path / "unlearn"
    ok(["train", "unlearn", "--preset", "tiny", "--init", str(pre), "--out", str(un), "--decision-weight", "5",
        "--quiet"])
    ucfg = json.loads((un / "config.json").read_text())
    assert ucfg["objective"]["decision_weight"] == 5 and "--decision-weight 5" in ucfg["command"]
    rows = [json.loads(line) for line in (un / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= row["dec_safe"] <= 1 for row in rows if "dec_safe" in row) and any("dec_safe" in r for r in rows)
    before = sorted(p.name for p in ft.iterdir())
    out = ok(["eval", str(pre), str(ft), "--n", "8", "--attack-n", "4", "--attack-steps", "2",
              "--json", str(tmp_path / "e.json")])
    assert "unsafe:refuse" in out and "adv" in out
    assert sorted(p.name for p in ft.iterdir()) == before  # checkpoints are never written to
    e = json.loads((tmp_path / "e.json").read_text())
    assert set(e) == {"pre", "ssft"} and 0 <= e["ssft"]["table"]["adv_soft_tokens"] <= 1
    out = ok(["analyze", str(pre), str(ft), "--out", str(tmp_path / "an")])
    s = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert s["scheme"] == "lab" and any(t["name"].endswith(".c_fc.weight") for t in s["matrices"])

    # errors: one line, non-zero exit, no traceback
    bad = r.invoke(main, ["train", "dpo", "--preset", "tiny", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--init" in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--out", str(pre), "--quiet"])
    assert bad.exit_code != 0 and "finished" in bad.output and "Traceback" not in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--decision-weight", "3", "--out", str(tmp_path / "z")])
    assert bad.exit_code != 0 and "--decision-weight" in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "nope", "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "nope" in bad.output
    bad = r.invoke(main, ["eval", str(tmp_path), "--n", "4", "--no-attack"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_cli_preset_objective_options_and_flags_override_them(tmp_path):
    r = CliRunner()
    pre = tmp_path / "pre"
    preset = tmp_path / "mine.toml"
    preset.write_text('extends = "tiny"\n[objectives.dpo]\nbeta = 0.05\nbeta_rejected = 0.005\n')

    def ok(args):
        res = r.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    ok(["train", "pretrain", "--preset", "tiny", "--steps", "2", "--out", str(pre), "--quiet"])
    common = ["--preset", str(preset), "--init", str(pre), "--steps", "2", "--quiet"]
    ok(["train", "dpo", *common, "--out", str(tmp_path / "a")])
    ok(["train", "dpo", *common, "--beta", "0.3", "--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "config.json").read_text())["objective"]
    b = json.loads((tmp_path / "b" / "config.json").read_text())["objective"]
    assert (a["beta"], a["beta_rejected"]) == (0.05, 0.005)
    assert (b["beta"], b["beta_rejected"]) == (0.3, 0.005)  # the flag wins, the rest of the preset stays


def test_adversarial_budget_sweep():
    """One attack per budget on the same samples; budgets scale the per-token norm; headline = budget 1."""
    from pysafe.lab.evaluate import adversarial_sweep

    m = _model(seed=2)
    res = adversarial_sweep(m, RECIPE, eps_factors=[0.5, 1.0, 4.0], n=6, n_soft=2, n_steps=3, batch_size=3)
    assert [s["eps_factor"] for s in res["sweep"]] == [0.5, 1.0, 4.0]
    assert res["eps_factor"] == 1.0 and res["success"] == res["sweep"][1]["success"]
    eps = [s["eps"] for s in res["sweep"]]
    assert eps[1] == pytest.approx(2 * eps[0]) and eps[2] == pytest.approx(8 * eps[0])
    assert res["loss_after"] <= res["loss_before"] + 1e-6
    with pytest.raises(ValueError, match="budgets must be > 0"):
        adversarial_sweep(m, RECIPE, eps_factors=[0.0], n=2)


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


def test_reproduce_end_to_end_tiny(tmp_path):
    """`pysafe reproduce` from nothing on the tiny preset: both learning rates, safety tables, analyze
    reports, clusters of every checkpoint and the claims table (with the strength claim); a second run reuses
    every finished stage."""
    from pysafe.pipeline.reproduce import reproduce

    out = tmp_path / "run"
    logs = []
    summary = reproduce("tiny", out, eval_n=8, log=logs.append, jobs=1)
    names = {"pretrain", *(f"{s}_lr{t}" for s in ("ssft", "dpo", "unlearn") for t in ("1em4", "1em5"))}
    assert set(summary["safety_table"]) == names
    assert {p.stem for p in (out / "eval").glob("*.json")} == names
    assert {p.name for p in (out / "analyze").iterdir()} == names - {"pretrain"}
    assert {p.name for p in (out / "clusters").iterdir()} == {"pretrained", "ssft", "dpo", "unlearn", "ssft_lr1em5",
                                                               "dpo_lr1em5", "unlearn_lr1em5"}
    claims = json.loads((out / "claims.json").read_text())
    assert any("grows with fine-tuning strength" in c["claim"] for c in claims)
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

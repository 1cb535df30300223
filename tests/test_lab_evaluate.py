"""lab/evaluate.py: the safety table (teacher forcing equals greedy generation, rates, the attack sweep)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pysafe.lab import data as D
from pysafe.lab.evaluate import safety_table, score_answers
from pysafe.lab.generate import generate
from pysafe.lab.model import GPTConfig
from pysafe.lab.vocab import PAD

from labkit import TINY1, tiny_model

RECIPE = D.DataRecipe()


def test_teacher_forced_exact_match_equals_greedy_generation():
    m = tiny_model(GPTConfig(n_layer=2, n_head=2, d_model=32), seed=5)
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
    m = tiny_model(TINY1)
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


def test_adversarial_budget_sweep():
    """One attack per budget on the same samples; budgets scale the per-token norm; headline = budget 1."""
    from pysafe.lab.evaluate import adversarial_sweep

    m = tiny_model(TINY1, seed=2)
    res = adversarial_sweep(m, RECIPE, eps_factors=[0.5, 1.0, 4.0], n=6, n_soft=2, n_steps=3, batch_size=3)
    assert [s["eps_factor"] for s in res["sweep"]] == [0.5, 1.0, 4.0]
    assert res["eps_factor"] == 1.0 and res["success"] == res["sweep"][1]["success"]
    eps = [s["eps"] for s in res["sweep"]]
    assert eps[1] == pytest.approx(2 * eps[0]) and eps[2] == pytest.approx(8 * eps[0])
    assert res["loss_after"] <= res["loss_before"] + 1e-6
    with pytest.raises(ValueError, match="budgets must be > 0"):
        adversarial_sweep(m, RECIPE, eps_factors=[0.0], n=2)

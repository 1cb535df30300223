"""lab/attacks.py: the soft-token attack (layout, budget, placement, loss, success) and its table column."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pysafe.lab.attacks import attack_success, insert_soft_block, soft_token_attack
from pysafe.lab.config import load_preset
from pysafe.lab.generate import generate_from_embeds
from pysafe.lab.model import GPTConfig

from labkit import EOT, PAD, tiny_model, token_batch


def test_insert_soft_block_layout():
    x, y, s, L = token_batch()
    ids, y2, soft_start, new_s = insert_soft_block(x, y, s, 3)
    for b in range(4):
        sb = int(s[b])
        assert torch.equal(ids[b, :sb], x[b, :sb]) and (ids[b, sb:sb + 3] == 0).all()
        assert torch.equal(ids[b, sb + 3:], x[b, sb:159 - 3]) and ids[b, sb + 3] == EOT
        assert (y2[b, sb - 1:sb + 3] == PAD).all() and torch.equal(y2[b, sb + 3:], y[b, sb:159 - 3])
        assert torch.equal(y2[b, :sb - 1], y[b, :sb - 1])
    assert torch.equal(new_s, s + 3) and torch.equal(soft_start, s)
    bad = x.clone()
    bad[0, s[0]] = 22
    with pytest.raises(ValueError, match="must be EOT"):
        insert_soft_block(bad, y, s, 3)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attack_budget_positions_and_frozen_model(norm):
    m = tiny_model(wte_std=1.0)
    m.train()
    for p in m.parameters():
        p.grad = None
    m.transformer.h[0].ln_2.weight.requires_grad_(False)  # a mixed requires_grad pattern is restored as it was
    flags = [p.requires_grad for p in m.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y, s, L = token_batch()
    res = soft_token_attack(m, x, y, s, n_soft=3, n_steps=8, eps_factor=0.5, norm=norm)
    assert m.training and [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    if norm == "l2":
        letters = m.transformer.wte.weight[22:52].detach()
        assert res.eps == pytest.approx(0.5 * float(letters.norm(dim=1).mean()), rel=1e-6)
        assert float(res.soft.norm(dim=-1).max()) <= res.eps + 1e-6
    else:
        assert float(res.soft.abs().max()) <= res.eps + 1e-6
    # only the soft positions differ from the clean embeddings of the shifted sequence
    clean = m.transformer.wte(res.ids).detach()
    diff = (res.embeds - clean).abs().sum(-1) > 0
    for b in range(4):
        sb = int(s[b])
        assert not diff[b, :sb].any() and not diff[b, sb + 3:].any() and diff[b, sb:sb + 3].all()
        torch.testing.assert_close(res.embeds[b, sb:sb + 3], res.soft[b])
    assert res.lr == pytest.approx(2 * res.eps / 8)
    assert res.losses.shape == (9, 4)


def test_attack_overlay_placement():
    """overlay: nothing moves; δ (within the budget) is added to the n prompt tokens before EOT only, and
    success is scored at the original positions."""
    m = tiny_model(wte_std=1.0)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 1.0)
    x, y, s, L = token_batch()
    res = soft_token_attack(m, x, y, s, n_soft=3, n_steps=12, eps_factor=1.0, placement="overlay")
    assert res.placement == "overlay" and res.inserted == 0
    assert torch.equal(res.ids, x) and torch.equal(res.y, y) and torch.equal(res.start_idx, s)
    assert torch.equal(res.soft_start, s - 3)
    clean = m.transformer.wte(x).detach()
    diff = res.embeds - clean
    for b in range(4):
        sb = int(s[b])
        assert diff[b, :sb - 3].abs().max() == 0 and diff[b, sb:].abs().max() == 0
        torch.testing.assert_close(diff[b, sb - 3:sb], res.soft[b])
    assert float(res.soft.norm(dim=-1).max()) <= res.eps + 1e-6
    assert (res.losses[-1] < res.losses[0]).all()
    ok, gen = attack_success(m, res, y)
    want = generate_from_embeds(m, res.embeds, gen.shape[1], lengths=s + 1)
    for b in range(4):
        Lb = int(L[b])
        assert bool(ok[b]) == torch.equal(want[b, :Lb], y[b, s[b]:s[b] + Lb])
    with pytest.raises(ValueError, match="placement"):
        soft_token_attack(m, x, y, s, placement="middle")


def test_attack_loss_decreases():
    m = tiny_model(wte_std=1.0)
    with torch.no_grad():  # a random model at init predicts ~uniformly; sharpen it so the attack has a signal
        m.lm_head.weight.normal_(0, 1.0)
    x, y, s, _ = token_batch()
    res = soft_token_attack(m, x, y, s, n_soft=4, n_steps=20, eps_factor=2.0)
    assert (res.losses[-1] < res.losses[0] - 1e-3).all()
    # the reported loss is the model's answer cross-entropy on the attacked embeddings
    with torch.no_grad():
        logits = m(inputs_embeds=res.embeds)
    pos = torch.arange(159)[None, :]
    sel = (res.y != PAD) & (pos >= res.start_idx[:, None])
    ce = F.cross_entropy(logits.flatten(0, 1), res.y.flatten(), reduction="none").view(4, 159)
    torch.testing.assert_close((ce * sel).sum(1) / sel.sum(1), res.losses[-1], rtol=1e-4, atol=1e-4)
    # the same seed gives the same attack
    again = soft_token_attack(m, x, y, s, n_soft=4, n_steps=20, eps_factor=2.0)
    assert torch.equal(again.soft, res.soft)


def test_attack_success_matches_generation():
    m = tiny_model(wte_std=1.0)
    x, y, s, L = token_batch()
    res = soft_token_attack(m, x, y, s, n_soft=2, n_steps=3)
    ok, gen = attack_success(m, res, y)
    assert gen.shape == (4, int(2 * L.max() + 2))
    # make sample 1's answer the model's own greedy output: success there, by construction
    y_own = y.clone()
    A = int(2 * L[1] + 2)
    y_own[1, s[1]:s[1] + A] = gen[1, :A]
    ok2, _ = attack_success(m, res, y_own)
    assert bool(ok2[1]) and not bool(ok.all())
    # apply_second: only block 2 (+ STOP) counts
    y_b2 = y.clone()
    Lb = int(L[2])
    y_b2[2, s[2] + Lb + 1:s[2] + 2 * Lb + 2] = gen[2, Lb + 1:2 * Lb + 2]
    ok3, _ = attack_success(m, res, y_b2, apply_second=torch.tensor([False, False, True, False]), scope="answer")
    assert bool(ok3[2])
    # scope: block1 scores only block 1's L letters; "answer" scores both blocks and STOPs
    y_b1 = y.clone()
    Lb = int(L[3])
    y_b1[3, s[3]:s[3] + Lb] = gen[3, :Lb]
    y_b1[3, s[3] + Lb] = (int(gen[3, Lb]) + 1) % 59  # a wrong STOP
    ok4, _ = attack_success(m, res, y_b1)
    ok5, _ = attack_success(m, res, y_b1, scope="answer")
    assert bool(ok4[3]) and not bool(ok5[3])
    with pytest.raises(ValueError, match="scope"):
        attack_success(m, res, y, scope="both")


def test_attack_table_on_test_set():
    from pysafe.lab.attacks import attack_table
    from pysafe.lab.data import DataRecipe

    m = tiny_model(GPTConfig(**load_preset("tiny")["model"]))
    out = attack_table(m, DataRecipe(), n=8, n_soft=2, n_steps=2, batch_size=4)
    assert out["n"] == 8 and 0.0 <= out["success"] <= 1.0 and 0.0 <= out["clean_success"] <= 1.0
    assert out["scope"] == "block1" and out["placement"] == "insert"  # texts of 25..35 letters
    import dataclasses
    fixed = dataclasses.replace(DataRecipe(), text_len_min=16, text_len_max=16)
    assert attack_table(m, fixed, n=4, n_steps=1, batch_size=4)["placement"] == "overlay"
    assert out["eps"] > 0 and math.isfinite(out["loss_after"])
    json.dumps(out)

"""lab/objectives.py: SSFT, DPO and unlearning losses against hand computations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pysafe.lab import data as D
from pysafe.lab.objectives import DPO, SSFT, Unlearn, make_objective
from pysafe.lab.vocab import PAD

from labkit import TINY1, tiny_model

RECIPE = D.DataRecipe()


def test_dpo_loss_is_log2_when_policy_equals_reference():
    m = tiny_model(TINY1)
    ref = copy.deepcopy(m)
    for obj in (DPO(), DPO(beta=0.5, beta_rejected=0.01)):
        batch = obj.batch(RECIPE, 16, step=3, total_steps=10, device="cpu")
        loss, metrics = obj.loss(m, batch, ref)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    # a different policy moves the loss away from log 2
    other = tiny_model(TINY1, seed=1)
    loss, _ = DPO().loss(other, DPO().batch(RECIPE, 16, 3, 10, "cpu"), ref)
    assert abs(loss.item() - math.log(2)) > 1e-4


def test_dpo_sequence_logprob_uses_each_responses_own_tokens():
    """D10: log π(response) sums over that response's supervised tokens only; checked by hand."""
    m = tiny_model(TINY1)
    obj = DPO()
    b = obj.batch(RECIPE, 4, 0, 10, "cpu")

    with torch.no_grad():
        lp = obj._pair_logprobs(m, b)[0].sum(-1)[4:]  # what DPO.loss sums: the rejected half
        ls = torch.log_softmax(m(b["x_rejected"]), -1)
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
    m = tiny_model(TINY1)
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
    m = tiny_model(TINY1)
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
    loss, _ = npo.loss(m, batch, tiny_model(TINY1))
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


# rejected_rest_weight: how much of the rejected answer DPO and unlearning push down

def _scramble_rejected_after_decision(batch, side="rejected"):
    """The same batch with every supervised token of the ``side`` answer after the decision token changed
    (both the input copy and the target), so only that answer's later tokens differ."""
    b = dict(batch)
    xr, yr = batch[f"x_{side}"].clone(), batch[f"y_{side}"].clone()
    dec = batch["decision"].int().argmax(1)
    for i in range(yr.shape[0]):
        for t in range(int(dec[i]) + 1, yr.shape[1]):
            if int(yr[i, t]) != PAD:
                new = (int(yr[i, t]) + 7) % 19  # another letter-range token, never PAD (20)
                yr[i, t] = new
                if t + 1 < xr.shape[1]:
                    xr[i, t + 1] = new  # x is y shifted by one
    b[f"x_{side}"], b[f"y_{side}"] = xr, yr
    return b


@pytest.mark.parametrize("cls", [DPO, Unlearn])
def test_rest_weight_zero_ignores_the_rejected_answers_later_tokens(cls):
    policy, ref = tiny_model(TINY1, seed=1), tiny_model(TINY1)
    for rest, should_change in ((0.0, False), (1.0, True), (0.5, True)):
        obj = cls(decision_weight=5.0, rejected_rest_weight=rest)
        b = obj.batch(RECIPE, 16, 3, 10, "cpu")
        assert b["decision"].any(1).all()
        with torch.no_grad():
            loss, _ = obj.loss(policy, b, ref)
            loss2, _ = obj.loss(policy, _scramble_rejected_after_decision(b), ref)
        changed = abs(loss.item() - loss2.item()) > 1e-6 * max(1.0, abs(loss.item()))
        assert changed == should_change, (cls.__name__, rest, loss.item(), loss2.item())


def test_rest_weight_one_is_the_plain_weighting_and_the_chosen_side_is_untouched():
    a = DPO(decision_weight=5.0).batch(RECIPE, 16, 3, 10, "cpu")
    b = DPO(decision_weight=5.0, rejected_rest_weight=1.0).batch(RECIPE, 16, 3, 10, "cpu")
    c = DPO(decision_weight=5.0, rejected_rest_weight=0.0).batch(RECIPE, 16, 3, 10, "cpu")
    assert torch.equal(a["w_rejected"], b["w_rejected"]) and torch.equal(a["w_chosen"], c["w_chosen"])
    # with rest 0 the rejected weight sits on the decision token alone
    assert torch.equal(c["w_rejected"] != 0, c["decision"])
    # the weighted path is taken for rest != 1 even at decision_weight 1
    d = DPO(rejected_rest_weight=0.0).batch(RECIPE, 16, 3, 10, "cpu")
    assert "w_rejected" in d and torch.equal(d["w_rejected"] != 0, d["decision"])
    # policy = reference still gives log 2
    m = tiny_model(TINY1)
    loss, _ = DPO(rejected_rest_weight=0.0).loss(m, d, copy.deepcopy(m))
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)


def test_dpo_on_the_decision_token_alone_matches_a_direct_computation():
    """chosen_rest_weight = rejected_rest_weight = 0: the loss is standard DPO on the decision token's
    log-probabilities, computed here directly (log-softmax at the decision positions), and scrambling
    either answer's later tokens leaves it unchanged; a chosen_rest_weight of 0.5 does see them."""
    policy, ref = tiny_model(TINY1, seed=1), tiny_model(TINY1)
    obj = DPO(beta=0.1, chosen_rest_weight=0.0, rejected_rest_weight=0.0)
    b = obj.batch(RECIPE, 16, 3, 10, "cpu")
    assert b["decision"].any(1).all()
    with torch.no_grad():
        loss, _ = obj.loss(policy, b, ref)
        rows = torch.arange(16)
        pos = b["decision"].int().argmax(1)

        def dec_logp(model, side):
            lp = torch.log_softmax(model(b[f"x_{side}"]).double(), -1)
            return lp[rows, pos, b[f"y_{side}"][rows, pos]]

        d_c = dec_logp(policy, "chosen") - dec_logp(ref, "chosen")
        d_r = dec_logp(policy, "rejected") - dec_logp(ref, "rejected")
        direct = -torch.nn.functional.logsigmoid(0.1 * (d_c - d_r)).mean()
        assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
        for side in ("chosen", "rejected"):
            loss2, _ = obj.loss(policy, _scramble_rejected_after_decision(b, side), ref)
            assert loss2.item() == pytest.approx(loss.item(), rel=1e-6), side
        half = DPO(beta=0.1, chosen_rest_weight=0.5, rejected_rest_weight=0.0)
        b2 = half.batch(RECIPE, 16, 3, 10, "cpu")
        l_a, _ = half.loss(policy, b2, ref)
        l_b, _ = half.loss(policy, _scramble_rejected_after_decision(b2, "chosen"), ref)
        assert abs(l_a.item() - l_b.item()) > 1e-6


def test_dpo_chosen_nll_weight_adds_alpha_times_the_chosen_cross_entropy():
    """RPO-style DPO: L(α) − L(0) is α times the chosen answer's cross-entropy (torch's own at w = 1; SSFT's
    loss on the same chosen answers at w = 5), and α = 0 is the paper's DPO."""
    policy, ref = tiny_model(TINY1, seed=1), tiny_model(TINY1)
    for w in (1.0, 5.0):
        plain = DPO(decision_weight=w, p_unsafe=0.5)
        rpo = DPO(decision_weight=w, p_unsafe=0.5, chosen_nll_weight=0.7)
        b0, b1 = plain.batch(RECIPE, 16, 3, 10, "cpu"), rpo.batch(RECIPE, 16, 3, 10, "cpu")
        with torch.no_grad():
            l0, _ = plain.loss(policy, b0, ref)
            l1, m1 = rpo.loss(policy, b1, ref)
            if w == 1.0:
                ce = torch.nn.functional.cross_entropy(policy(b0["x_chosen"]).flatten(0, 1).double(),
                                                       b0["y_chosen"].flatten(), ignore_index=PAD)
            else:
                sft = SSFT(decision_weight=w, p_unsafe=0.5)
                ce, _ = sft.loss(policy, sft.batch(RECIPE, 16, 3, 10, "cpu"))
        assert l1.item() - l0.item() == pytest.approx(0.7 * ce.item(), rel=1e-5), w
        assert m1["nll_chosen"] == pytest.approx(ce.item(), rel=1e-5)
    # with the DPO term on the decision token alone, the added cross-entropy still weights the whole answer
    rest0 = dict(decision_weight=5.0, p_unsafe=0.5, chosen_rest_weight=0.0, rejected_rest_weight=0.0)
    plain, rpo = DPO(**rest0), DPO(**rest0, chosen_nll_weight=0.7)
    with torch.no_grad():
        l0, _ = plain.loss(policy, plain.batch(RECIPE, 16, 3, 10, "cpu"), ref)
        l1, _ = rpo.loss(policy, rpo.batch(RECIPE, 16, 3, 10, "cpu"), ref)
        sft = SSFT(decision_weight=5.0, p_unsafe=0.5)
        ce, _ = sft.loss(policy, sft.batch(RECIPE, 16, 3, 10, "cpu"))
    assert l1.item() - l0.item() == pytest.approx(0.7 * ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="chosen_nll_weight must be non-negative"):
        make_objective("dpo", chosen_nll_weight=-1.0)


def test_rest_weight_is_validated():
    with pytest.raises(ValueError, match="chosen_rest_weight must be in"):
        make_objective("dpo", chosen_rest_weight=2.0)
    with pytest.raises(ValueError, match="no option chosen_rest_weight"):
        make_objective("unlearn", chosen_rest_weight=0.0)
    with pytest.raises(ValueError, match="rejected_rest_weight must be in"):
        make_objective("dpo", rejected_rest_weight=1.5)
    with pytest.raises(ValueError, match="rejected_rest_weight must be in"):
        make_objective("unlearn", rejected_rest_weight=-0.1)
    assert make_objective("unlearn", rejected_rest_weight=0.0).rejected_rest_weight == 0.0


def test_dpo_rest_zero_reads_the_rejected_decision_token_from_the_chosen_pass():
    """With rejected_rest_weight 0, DPO reads the rejected decision token's log-probability from the chosen
    sequence's forward pass. Checked against the two-pass computation written out here (each answer through
    the model on its own, the weighted log-probabilities summed by hand): same loss and same gradients, at
    the cpu preset's weighting and on batches of both recipes' texts, and the prefix the reading relies on
    (both sequences agree up to and including the decision position's input) holds on every row."""
    policy, ref = tiny_model(TINY1, seed=1), tiny_model(TINY1)
    recipes = (RECIPE, D.DataRecipe(category_probs=(0.0, 0.5, 0.0, 0.0, 0.5, 0.0)))
    for recipe, step, kw in ((recipes[0], 3, dict(decision_weight=20.0)),
                             (recipes[1], 7, dict(decision_weight=20.0, chosen_nll_weight=0.5)),
                             (recipes[1], 11, dict(decision_weight=1.0, chosen_rest_weight=0.0))):
        obj = DPO(beta=6.3e-4, beta_rejected=6.3e-5, p_unsafe=0.5, rejected_rest_weight=0.0, **kw)
        b = obj.batch(recipe, 32, step, 10, "cpu")
        pos = b["decision"].int().argmax(1)
        for i in range(32):
            if b["decision"][i].any():
                p = int(pos[i])
                assert torch.equal(b["x_chosen"][i, :p + 1], b["x_rejected"][i, :p + 1]), (step, i)

        policy.zero_grad()
        loss, _ = obj.loss(policy, b, ref)
        loss.backward()
        grads = [None if q.grad is None else q.grad.clone() for q in policy.parameters()]
        assert sum(g is not None for g in grads) > 2

        def weighted_sum(model, side, w):
            lp = torch.log_softmax(model(b[f"x_{side}"]).double(), -1)
            y = b[f"y_{side}"]
            tok = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return (tok * ((y != PAD).double() * w.double())).sum(-1)

        policy.zero_grad()
        with torch.no_grad():
            r_c = weighted_sum(ref, "chosen", b["w_chosen"])
            r_r = weighted_sum(ref, "rejected", b["w_rejected"])
        d_c = weighted_sum(policy, "chosen", b["w_chosen"]) - r_c
        d_r = weighted_sum(policy, "rejected", b["w_rejected"]) - r_r
        direct = -torch.nn.functional.logsigmoid(6.3e-4 * d_c - 6.3e-5 * d_r).mean()
        if "w_nll" in b:
            y = b["y_chosen"]
            lp = torch.log_softmax(policy(b["x_chosen"]).double(), -1)
            tok = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            wt = (y != PAD).double() * b["w_nll"].double()
            direct = direct + 0.5 * (-(tok * wt).sum() / wt.sum())
        direct.backward()
        assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
        for g, q in zip(grads, policy.parameters()):
            assert (g is None) == (q.grad is None)
            if g is not None:
                scale = float(q.grad.abs().max())
                assert torch.allclose(g.double(), q.grad.double(), rtol=1e-4, atol=1e-6 * scale), step


@pytest.mark.parametrize("forget", ["clamp", "npo"])
def test_unlearn_rest_zero_reads_the_rejected_decision_token_from_the_chosen_pass(forget):
    """Unlearning at rejected_rest_weight 0 (the cpu preset's) against the two-pass computation written out
    here from the class's documented formula: the retain NLL (per-token mean over each chosen answer, then
    over rows) minus w_forget times the clamped forget NLL at the rejected decision token, or NPO's term on
    the rejected answer through its own forward pass. Same loss, same gradients."""
    policy, ref = tiny_model(TINY1, seed=2), tiny_model(TINY1)
    obj = Unlearn(p_unsafe=0.5, decision_weight=20.0, rejected_rest_weight=0.0, forget=forget, w_forget=0.3)
    b = obj.batch(RECIPE, 32, 5, 10, "cpu")
    policy.zero_grad()
    loss, _ = obj.loss(policy, b, ref)
    loss.backward()
    grads = [None if q.grad is None else q.grad.clone() for q in policy.parameters()]

    def per_token(model, side):
        lp = torch.log_softmax(model(b[f"x_{side}"]).double(), -1)
        y = b[f"y_{side}"]
        w = (y != PAD).double() * b[f"w_{side}"].double()
        return lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * w, w

    policy.zero_grad()
    tc, wc = per_token(policy, "chosen")
    tr, wr = per_token(policy, "rejected")
    retain = (-tc.sum(-1) / wc.sum(-1).clamp_min(1)).mean()
    if forget == "clamp":
        direct = retain - 0.3 * torch.clamp(-tr.sum(-1) / wr.sum(-1).clamp_min(1), max=math.log(59)).mean()
    else:
        with torch.no_grad():
            ref_r, _ = per_token(ref, "rejected")
        ratio = tr.sum(-1) - ref_r.sum(-1)
        direct = retain + 0.3 * (2 / 0.1) * torch.nn.functional.softplus(0.1 * ratio).mean()
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    for g, q in zip(grads, policy.parameters()):
        assert (g is None) == (q.grad is None)
        if g is not None:
            assert torch.allclose(g.double(), q.grad.double(), rtol=1e-4, atol=1e-6 * float(q.grad.abs().max()))

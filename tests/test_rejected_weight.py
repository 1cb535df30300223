"""``rejected_rest_weight``: how much of the rejected answer DPO and unlearning push down (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

from pysafe.lab import data as D
from pysafe.lab.model import GPT, GPTConfig
from pysafe.lab.objectives import DPO, Unlearn, make_objective
from pysafe.lab.vocab import PAD

RECIPE = D.DataRecipe()


def _model(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, d_model=32)).eval()


def _scramble_rejected_after_decision(batch):
    """The same batch with every supervised rejected token after the decision token changed (both the
    input copy and the target), so only the rejected answer's later tokens differ."""
    b = dict(batch)
    xr, yr = batch["x_rejected"].clone(), batch["y_rejected"].clone()
    dec = batch["decision"].int().argmax(1)
    for i in range(yr.shape[0]):
        for t in range(int(dec[i]) + 1, yr.shape[1]):
            if int(yr[i, t]) != PAD:
                new = (int(yr[i, t]) + 7) % 19  # another letter-range token, never PAD (20)
                yr[i, t] = new
                if t + 1 < xr.shape[1]:
                    xr[i, t + 1] = new  # x is y shifted by one
    b["x_rejected"], b["y_rejected"] = xr, yr
    return b


@pytest.mark.parametrize("cls", [DPO, Unlearn])
def test_rest_weight_zero_ignores_the_rejected_answers_later_tokens(cls):
    policy, ref = _model(1), _model(0)
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
    m = _model(0)
    loss, _ = DPO(rejected_rest_weight=0.0).loss(m, d, copy.deepcopy(m))
    assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)


def test_rest_weight_is_validated():
    with pytest.raises(ValueError, match="rejected_rest_weight must be in"):
        make_objective("dpo", rejected_rest_weight=1.5)
    with pytest.raises(ValueError, match="rejected_rest_weight must be in"):
        make_objective("unlearn", rejected_rest_weight=-0.1)
    assert make_objective("unlearn", rejected_rest_weight=0.0).rejected_rest_weight == 0.0

"""Training objectives: pretraining, SSFT, DPO and unlearning as plug-ins of the one loop in ``train.py``.

An objective draws its own batch (the data are generated on the fly from ``(recipe.seed, step)``, so a
resumed run sees exactly the batches it would have seen) and turns it into a scalar loss plus a few
running metrics (docs/lab.md). Where pysafe departs from the reference code:

- mixing of safe and unsafe samples is per sample;
- DPO and unlearning score each response by the sum of log-probabilities over *its own* supervised
  tokens, never with borrowed masks or a constant length;
- the DPO reference model runs under ``no_grad``; the unlearning forget term is bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from pysafe.lab import data as D
from pysafe.lab.vocab import PAD

OBJECTIVES = ("pretrain", "ssft", "dpo", "unlearn", "benign")


def _t(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=torch.long)


def _trim(*arrays: np.ndarray) -> list[np.ndarray]:
    """Cut the trailing columns that are PAD in every row of every array.

    Exact for a causal model: positions after the last real token can influence no earlier position and
    carry no targets. Samples end at 6 + 3L + 3 ≤ 114 of the 159 positions, so this saves about a
    quarter of every step.
    """
    width = 1
    for a in arrays:
        cols = np.nonzero((a != PAD).any(0))[0]
        if cols.size:
            width = max(width, int(cols[-1]) + 1)
    return [a[:, :width] for a in arrays]


def token_logprobs(logits: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(y_t) (0 where y is PAD) and the supervised-token weights (the mask, times
    ``weight`` when given), both [B, T]. The log-probabilities are already multiplied by the weights."""
    mask = (y != PAD).float()
    if weight is not None:
        mask = mask * weight
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return tok * mask, mask


def decision_positions(y_chosen: np.ndarray, y_rejected: np.ndarray) -> np.ndarray:
    """bool [B, T]: the first position where the chosen and the rejected answer are both supervised and
    differ, i.e. the token at which a model commits to refusing or complying (block 1's first letter, or
    block 2's when only block 2 is refused). A row whose answers never differ has no such position."""
    differ = (y_chosen != PAD) & (y_rejected != PAD) & (y_chosen != y_rejected)
    first = differ.argmax(1)
    out = np.zeros(differ.shape, dtype=bool)
    rows = np.nonzero(differ.any(1))[0]
    out[rows, first[rows]] = True
    return out


def decision_weights(decision: np.ndarray, w: float, rest: float = 1.0) -> np.ndarray:
    """float32 [B, T]: ``rest`` everywhere, ``w`` where ``decision`` (:func:`decision_positions`) is True."""
    out = np.full(decision.shape, rest, dtype=np.float32)
    out[decision] = w
    return out


def token_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    mask = y != PAD
    n = int(mask.sum())
    if n == 0:
        return float("nan")
    return float(((logits.argmax(-1) == y) & mask).sum()) / n


@dataclass
class Pretrain:
    """Next-token cross-entropy under the curriculum of docs/lab.md (clock in optimizer steps)."""

    name = "pretrain"
    uses_reference = False
    relative_cost = 1.0  # work per sample relative to SSFT's (see _SafetyObjective.relative_cost)

    def batch(self, recipe, n: int, step: int, total_steps: int, device) -> dict:
        b = D.pretrain_batch(recipe, n, step, total_steps)
        x, y = _trim(b.x, b.y)
        return {"x": _t(x, device), "y": _t(y, device)}

    def loss(self, model, batch: dict, ref=None):
        logits = model(batch["x"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten(), ignore_index=PAD)
        metrics = {"acc": token_accuracy(logits.detach(), batch["y"])}
        if "spans" in batch:
            metrics.update(span_accuracies(logits.detach(), batch["y"], batch["spans"]))
        return loss, metrics

    def eval_batch(self, recipe, n: int, device) -> dict:
        """The held-out set of docs/lab.md (mode full w.p. 0.9, comp2 w.p. 0.1) with the spans of the reference's
        accuracy definitions."""
        b = D.pretrain_eval_batch(recipe, n, 0)
        return {"x": _t(b.x, device), "y": _t(b.y, device),
                "spans": (b.start_idx, b.end_idx[:, 0], b.end_idx[:, 1], b.mode)}


def span_accuracies(logits: torch.Tensor, y: torch.Tensor, spans) -> dict:
    """The reference's teacher-forced accuracies (docs/lab.md): per-sample token accuracy over a span,
    averaged over eligible samples; ``*_and`` is the exact match of the whole span.

    pcfg: text + EOT [5, start) on modes ≠ comp2; comp1: [start, end1); comp2: [end1, end2) on mode full;
    comp2_mod: the same on mode comp2 (block 2 from block 1 alone); comp12_and: [start, end2) exact.
    """
    start, end1, end2, mode = (np.asarray(a, dtype=np.int64) for a in spans)
    ok = ((logits.argmax(-1) == y) & (y != PAD)).cpu().numpy()
    full, comp2 = mode == 1, mode == 3

    def acc(lo, hi, sel):
        per = [ok[i, lo[i]:hi[i]].mean() for i in np.nonzero(sel)[0] if hi[i] > lo[i]]
        exact = [ok[i, lo[i]:hi[i]].all() for i in np.nonzero(sel)[0] if hi[i] > lo[i]]
        return (float(np.mean(per)), float(np.mean(exact))) if per else (float("nan"), float("nan"))

    five = np.full_like(start, 5)
    out = {}
    out["acc_pcfg"], _ = acc(five, start, ~comp2)
    out["acc_comp1"], out["comp1_and"] = acc(start, end1, full)
    out["acc_comp2"], out["comp2_and"] = acc(end1, end2, full)
    out["acc_comp2_mod"], _ = acc(end1, end2, comp2)
    _, out["comp12_and"] = acc(start, end2, full)
    return out


def _pick_unsafe(n: int, p_unsafe: float, seed: int, step: int) -> np.ndarray:
    """Per-sample safe/unsafe choice, reproducible from (seed, step)."""
    rng = np.random.default_rng([seed, 0x5AFE, step])
    return rng.random(n) < p_unsafe


def _choose(pick: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of ``a`` where pick is True, of ``b`` elsewhere."""
    return np.where(pick[:, None], a, b)


@dataclass
class _SafetyObjective:
    """Shared by the three safety objectives.

    ``decision_weight`` w multiplies the loss term of the *decision token*, the first position where the
    chosen and the rejected answer differ (:func:`decision_positions`); every other supervised token keeps
    weight 1, and w = 1 is the plain objective of docs/lab.md. The refuse-or-comply choice is one token of an
    L + 1 token answer, so under the plain objective it carries ~1/26 of the gradient; the rest is copying
    that the pretrained model already does. Short CPU fine-tunes (the cpu preset) raise w to learn the
    choice in their ~1/80 of the paper's samples (docs/results.md, "History", has the measurements).
    """

    p_unsafe: float = 0.5
    decision_weight: float = 1.0
    hard_frac: float = 0.0  # D.safety_batch: share of unsafe-branch samples made unsafe by B operators alone
    # Weight of the rejected answer's tokens other than its decision token (DPO and unlearning; 1 = the
    # paper's objective). The rejected answer is pushed down token by token without bound (DPO in its
    # linear regime, where the small β keeps it, and unlearning up to its clamp); its later tokens are the
    # same copying the safe answers need, so pushing them down erodes the safe answers. 0 pushes down only
    # the choice to comply (or refuse).
    rejected_rest_weight: float = 1.0

    def _pairs(self, recipe, n, step, device, chosen_rest: float = 1.0, nll: bool = False):
        """The chosen/rejected batch; ``chosen_rest`` weights the chosen answer's tokens after its decision
        token (DPO's option), ``nll`` adds ``w_nll``, SSFT's token weights for a cross-entropy on the chosen."""
        b = D.safety_batch(recipe, n, step, self.hard_frac)
        pick = _pick_unsafe(n, self.p_unsafe, recipe.seed, step)
        xc, yc, xr, yr = _trim(_choose(pick, b.x_unsafe, b.x_safe), _choose(pick, b.y_unsafe, b.y_safe),
                               _choose(pick, b.x_unsafe_target, b.x_safe_target),
                               _choose(pick, b.y_unsafe_target, b.y_safe_target))
        decision = decision_positions(yc, yr)
        out = {"x_chosen": _t(xc, device), "y_chosen": _t(yc, device), "x_rejected": _t(xr, device),
               "y_rejected": _t(yr, device), "unsafe": torch.from_numpy(pick).to(device),
               "decision": torch.from_numpy(decision).to(device)}
        if self.decision_weight != 1.0 or self.rejected_rest_weight != 1.0 or chosen_rest != 1.0:
            w = decision_weights(decision, self.decision_weight, chosen_rest)
            out["w_chosen"] = out["w_rejected"] = torch.from_numpy(w).to(device)
            if self.rejected_rest_weight != chosen_rest:
                w = decision_weights(decision, self.decision_weight, self.rejected_rest_weight)
                out["w_rejected"] = torch.from_numpy(w).to(device)
        if nll and self.decision_weight != 1.0:
            out["w_nll"] = (out["w_chosen"] if chosen_rest == 1.0
                            else torch.from_numpy(decision_weights(decision, self.decision_weight)).to(device))
        return out

    @property
    def one_pass(self) -> bool:
        """The rejected answer counts at its decision token alone (``rejected_rest_weight`` 0), so its
        log-probability can be read from the chosen answer's forward pass (:meth:`_pair_logprobs`)."""
        return self.rejected_rest_weight == 0.0

    #: passes of the reference per sample (DPO: both answers, NPO unlearning: the rejected one)
    _reference_rows = 0

    @property
    def relative_cost(self) -> float:
        """Matmul work per sample relative to SSFT's one forward+backward of the chosen answer (3 units: a
        backward costs two forwards): a second forward+backward over the rejected answer unless
        :attr:`one_pass`, and the reference's forwards (``pysafe reproduce --jobs`` starts the costliest
        fine-tunes first)."""
        passes = 1 if self.one_pass else 2
        ref = min(self._reference_rows, passes) if self.uses_reference else 0
        return (3 * passes + ref) / 3

    def _pair_logprobs(self, model, batch):
        """(tok, weight, logits_chosen): the per-token weighted log-probabilities and the weights of the
        chosen answers, then of the rejected ones, [2n, T] (:func:`token_logprobs`), and the chosen answers'
        logits.

        With ``rejected_rest_weight`` 0 the rejected answer is weighted at its decision token alone, which
        a causal model predicts from the prompt and the answer tokens before it, tokens the two answers
        share: its log-probability is read from the chosen sequence's forward pass (the logits at the
        decision position, at the rejected token), so one pass of n rows replaces two, with the same loss
        and gradients (tests/test_lab_objectives.py) at about half the cost."""
        if self.one_pass:
            logits = model(batch["x_chosen"])
            tok_c, w_c = token_logprobs(logits, batch["y_chosen"], batch.get("w_chosen"))
            tok_r, w_r = token_logprobs(logits, batch["y_rejected"], batch["w_rejected"])
            return torch.cat([tok_c, tok_r]), torch.cat([w_c, w_r]), logits
        x = torch.cat([batch["x_chosen"], batch["x_rejected"]])
        y = torch.cat([batch["y_chosen"], batch["y_rejected"]])
        w = torch.cat([batch["w_chosen"], batch["w_rejected"]]) if "w_chosen" in batch else None
        logits = model(x)
        tok, weight = token_logprobs(logits, y, w)
        return tok, weight, logits[:batch["x_chosen"].shape[0]]


@dataclass
class SSFT(_SafetyObjective):
    """Supervised safety fine-tuning: cross-entropy on the safe answer or on the refusal (docs/lab.md).

    ``p_unsafe`` is the per-sample probability of the unsafe version (the reference's README: 0.2).
    """

    name = "ssft"
    relative_cost = 1.0  # one forward+backward of the chosen answer: the unit
    uses_reference = False
    p_unsafe: float = 0.2

    def batch(self, recipe, n, step, total_steps, device):
        p = self._pairs(recipe, n, step, device)
        out = {"x": p["x_chosen"], "y": p["y_chosen"], "unsafe": p["unsafe"], "decision": p["decision"]}
        if "w_chosen" in p:
            out["w"] = p["w_chosen"]
        return out

    def loss(self, model, batch, ref=None):
        logits = model(batch["x"])
        if "w" in batch:  # weighted mean over supervised tokens; w = 1 is exactly the plain cross-entropy
            tok, weight = token_logprobs(logits, batch["y"], batch["w"])
            loss = -tok.sum() / weight.sum().clamp_min(1e-12)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten(), ignore_index=PAD)
        return loss, _split_acc(logits.detach(), batch["y"], batch["unsafe"], batch.get("decision"))


#: the benign fine-tuning data: which training texts, in their safe version (``DataRecipe.category_probs``
#: order: unsafe, safe, intermediate, duplicates, id_mg, ood_mg)
BENIGN_TEXTS = {
    "mix": None,  # the recipe's own mix of texts (cpu and paper presets: safe-branch and id_mg texts, half each)
    "safe_branch": (0.0, 1.0, 0.0, 0.0, 0.0, 0.0),  # texts of the safe branch only
    "unsafe_branch": (0.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # texts of the unsafe branch (id_mg), with safe operators
}


@dataclass
class Benign(SSFT):
    """Benign fine-tuning of a (safety-tuned) model: cross-entropy on the correct answers to safe requests
    only, never a refusal and never an unsafe request. It is the further fine-tune whose effect on safety
    ``pysafe drift`` predicts: does training on harmless data erode the refusals?

    ``texts`` picks the training texts (:data:`BENIGN_TEXTS`): the recipe's mix, safe-branch texts only, or
    the unsafe branch's texts (the ones the unsafe requests are about) with safe operators. ``data_seed``
    offsets the recipe's data seed so that the benign stream is not the safety fine-tune's own samples.
    """

    name = "benign"
    p_unsafe: float = 0.0
    texts: str = "mix"
    data_seed: int = 1

    def __post_init__(self):
        if self.p_unsafe != 0.0:
            raise ValueError(f"benign fine-tuning has no unsafe samples: p_unsafe must be 0, found {self.p_unsafe!r}")
        if not isinstance(self.texts, str) or self.texts not in BENIGN_TEXTS:
            raise ValueError(f"texts must be one of {', '.join(BENIGN_TEXTS)}, found {self.texts!r}")

    def _recipe(self, recipe):
        probs = BENIGN_TEXTS[self.texts]
        return replace(recipe, seed=recipe.seed + 7919 * self.data_seed,
                       **({"category_probs": probs} if probs is not None else {}))

    def batch(self, recipe, n, step, total_steps, device):
        return super().batch(self._recipe(recipe), n, step, total_steps, device)


def _split_acc(logits, y, unsafe, decision=None) -> dict:
    """Teacher-forced token accuracy on the safe and the unsafe samples, and (``dec_*``) the accuracy of
    the decision token alone (:func:`decision_positions`), the one that says refuse or comply."""
    out = {}
    for key, sel in (("safe", ~unsafe), ("unsafe", unsafe)):
        if bool(sel.any()):
            out["acc_" + key] = token_accuracy(logits[sel], y[sel])
            if decision is not None and bool(decision[sel].any()):
                right = (logits[sel].argmax(-1) == y[sel])[decision[sel]]
                out["dec_" + key] = float(right.float().mean())
    return out


@dataclass
class DPO(_SafetyObjective):
    """Direct preference optimisation against a frozen reference (docs/lab.md).

    L = −mean log σ(β·(log π_θ − log π_ref)(chosen) − β_r·(log π_θ − log π_ref)(rejected)), with the
    log-probabilities summed over each response's own supervised tokens. ``beta_rejected=None`` is
    standard DPO (β_r = β); the reference's asymmetric variant is β = 0.1, β_r = 0.01.
    """

    name = "dpo"
    _reference_rows = 2
    uses_reference = True
    p_unsafe: float = 0.5
    beta: float = 0.1
    beta_rejected: float | None = None
    # Weight of the chosen answer's tokens other than its decision token (1 = the paper's objective). With
    # rejected_rest_weight also 0, the preference is over the decision token alone: the later tokens of the
    # chosen refusal are trivially predictable, so their log-ratio grows fast and saturates the margin before
    # the refusal itself is learnt, while the later tokens of a compliant answer are copying the pretrained
    # model already does.
    chosen_rest_weight: float = 1.0
    # Weight α of an added cross-entropy on the chosen answer (0 = the paper's DPO): L_DPO + α·NLL(chosen),
    # the NLL a token mean with the decision token weighted as in SSFT. This is the "DPO + SFT loss" of
    # RPO (Pang et al. 2024) and Llama 3's preference stage (α = 0.2); it anchors the copying that a
    # preference over the decision token alone leaves free to drift.
    chosen_nll_weight: float = 0.0

    def batch(self, recipe, n, step, total_steps, device):
        return self._pairs(recipe, n, step, device, chosen_rest=self.chosen_rest_weight,
                           nll=self.chosen_nll_weight > 0)

    def loss(self, model, batch, ref=None):
        if ref is None:
            raise ValueError("DPO needs a reference model (the --init checkpoint)")
        n = batch["x_chosen"].shape[0]
        tok, _, logits_chosen = self._pair_logprobs(model, batch)
        lp = tok.sum(-1)
        with torch.no_grad():
            lp_ref = self._pair_logprobs(ref, batch)[0].sum(-1)
        d_chosen = lp[:n] - lp_ref[:n]
        d_rejected = lp[n:] - lp_ref[n:]
        beta_r = self.beta if self.beta_rejected is None else self.beta_rejected
        margin = self.beta * d_chosen - beta_r * d_rejected
        loss = -F.logsigmoid(margin).mean()
        metrics = _split_acc(logits_chosen.detach(), batch["y_chosen"], batch["unsafe"], batch["decision"])
        if self.chosen_nll_weight > 0:
            tok, weight = token_logprobs(logits_chosen, batch["y_chosen"], batch.get("w_nll"))
            nll = -tok.sum() / weight.sum().clamp_min(1e-12)
            metrics["nll_chosen"] = float(nll.detach())
            loss = loss + self.chosen_nll_weight * nll
        metrics["margin"] = float(margin.detach().mean())
        metrics["pref_acc"] = float((margin.detach() > 0).float().mean())
        return loss, metrics


@dataclass
class Unlearn(_SafetyObjective):
    """Unlearning: descend on the preferred answer, ascend (bounded) on the dispreferred one.

    L = w_retain·NLL(chosen) − w_forget·min(NLL(rejected), forget_clamp), with NLL the per-token mean
    over each response's own supervised tokens. The clamp (default ln V, the NLL of a uniform guess)
    bounds the loss from below, so the ascent cannot diverge. ``forget="npo"`` uses the NPO loss
    (2/β)·log(1 + (π_θ/π_ref)^β) on the rejected response instead, which needs the reference.
    """

    name = "unlearn"
    _reference_rows = 1
    p_unsafe: float = 0.5
    w_retain: float = 1.0
    w_forget: float = 0.1
    forget_clamp: float = math.log(59)
    forget: str = "clamp"
    npo_beta: float = 0.1

    @property
    def uses_reference(self) -> bool:
        return self.forget == "npo"

    def batch(self, recipe, n, step, total_steps, device):
        return self._pairs(recipe, n, step, device)

    def loss(self, model, batch, ref=None):
        n = batch["x_chosen"].shape[0]
        tok, mask, logits_chosen = self._pair_logprobs(model, batch)
        count = mask.sum(-1).clamp_min(1)
        nll = -tok.sum(-1) / count
        retain = nll[:n].mean()
        if self.forget == "npo":
            if ref is None:
                raise ValueError("NPO unlearning needs a reference model (the --init checkpoint)")
            with torch.no_grad():
                x = batch["x_chosen" if self.one_pass else "x_rejected"]
                ref_tok, _ = token_logprobs(ref(x), batch["y_rejected"], batch.get("w_rejected"))
            log_ratio = tok[n:].sum(-1) - ref_tok.sum(-1)
            forget_term = (2.0 / self.npo_beta) * F.softplus(self.npo_beta * log_ratio).mean()
            loss = self.w_retain * retain + self.w_forget * forget_term
        else:
            forget_term = torch.clamp(nll[n:], max=self.forget_clamp).mean()
            loss = self.w_retain * retain - self.w_forget * forget_term
        metrics = _split_acc(logits_chosen.detach(), batch["y_chosen"], batch["unsafe"], batch["decision"])
        metrics["nll_rejected"] = float(nll[n:].detach().mean())
        return loss, metrics


#: numeric objective options in [0, 1], and those that may be 0; every other number must be positive
_UNIT_OPTIONS = frozenset({"p_unsafe", "hard_frac", "rejected_rest_weight", "chosen_rest_weight"})
_NONNEGATIVE_OPTIONS = frozenset({"w_forget", "chosen_nll_weight"})


def make_objective(name: str, **kwargs):
    """Objective by name; ``kwargs`` are its fields (unknown ones raise a ValueError naming them)."""
    classes = {"pretrain": Pretrain, "ssft": SSFT, "dpo": DPO, "unlearn": Unlearn, "benign": Benign}
    if name not in classes:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    cls = classes[name]
    fields = set(cls.__dataclass_fields__)
    bad = sorted(set(kwargs) - fields)
    if bad:
        raise ValueError(f"objective {name!r} has no option {', '.join(bad)}; options: {', '.join(sorted(fields)) or 'none'}")
    if name == "unlearn" and kwargs.get("forget", "clamp") not in ("clamp", "npo"):
        raise ValueError(f"unlearn forget must be 'clamp' or 'npo', got {kwargs['forget']!r}")
    for key, value in kwargs.items():
        default = cls.__dataclass_fields__[key].default
        if (default is not None and not isinstance(default, (int, float))) or (default is None and value is None):
            continue  # a string option (forget, texts), checked by its objective, or an optional number left unset
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, found {value!r}")
        if key in _UNIT_OPTIONS and not 0 <= value <= 1:
            raise ValueError(f"{key} must be in [0, 1], found {value!r}")
        if key in _NONNEGATIVE_OPTIONS and value < 0:
            raise ValueError(f"{key} must be non-negative, found {value!r}")
        if key == "data_seed" and (value < 0 or value != int(value)):
            raise ValueError(f"data_seed must be a non-negative integer, found {value!r}")
        if key not in _UNIT_OPTIONS | _NONNEGATIVE_OPTIONS | {"data_seed"} and not value > 0:
            raise ValueError(f"{key} must be positive, found {value!r}")
    return cls(**kwargs)

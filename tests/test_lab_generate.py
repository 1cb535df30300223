"""lab/generate.py: batched greedy generation against a token-by-token loop."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from pysafe.lab.generate import generate, generate_from_embeds
from pysafe.lab.model import GPTConfig

from labkit import TINY, tiny_model, token_batch


def _manual_greedy(m, prompt, n):
    seq = prompt.clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(m(seq[None])[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    return torch.tensor(out)


@pytest.mark.parametrize("pad_mask", [False, True])
def test_generate_matches_manual_loop(pad_mask):
    m = tiny_model(GPTConfig(**{**asdict(TINY), "pad_mask": pad_mask}), wte_std=1.0)
    x, _, s, _ = token_batch()
    prompts = [x[b, :s[b] + 1] for b in range(4)]
    got = generate(m, prompts, 12)
    got2 = generate(m, x, 12, lengths=s + 1)
    for b in range(4):
        want = _manual_greedy(m, prompts[b], 12)
        assert torch.equal(got[b], want) and torch.equal(got2[b], want)
    got3 = generate_from_embeds(m, m.transformer.wte(x).detach(), 12, lengths=s + 1)
    assert torch.equal(got3, got)


@pytest.mark.parametrize("block", ["reference", "preln"])
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
@pytest.mark.parametrize("pad_mask", [False, True])
def test_decode_step_logits_equal_the_full_forward(block, pos, pad_mask):
    """The cached path against the plain forward pass: after a prefill of each prompt, feeding the
    rest of the sequence one token at a time gives, at every position, the logits the full forward
    computes there (PAD tokens inside the sequence included, which pad_mask models do not attend to)."""
    m = tiny_model(GPTConfig(**{**asdict(TINY), "block": block, "pos": pos, "pad_mask": pad_mask}), wte_std=1.0)
    x, _, s, _ = token_batch()
    x = x[:, :70].clone()
    x[1, 45] = 20  # a PAD token inside sample 1's continuation
    full = m(x)
    lengths = s + 1  # prompts of different lengths, left-aligned
    L0 = int(lengths.max())
    logits, cache = m.prefill(x[:, :L0], width=70)
    assert torch.allclose(logits, full[:, :L0], atol=1e-5, rtol=1e-5)
    rows = torch.arange(4)
    for k in range(1, 70 - L0 + 1):
        p = lengths + k - 1
        step = m.decode_step(p, cache, x[rows, p])
        assert torch.allclose(step, full[rows, p], atol=1e-5, rtol=1e-5), (k, (step - full[rows, p]).abs().max())
    # the same through embeddings (the soft-token attack's path); nothing is masked there
    e = m.transformer.wte(x).detach()
    full_e = m(inputs_embeds=e, key_pad=torch.zeros(4, 70, dtype=torch.bool))
    logits, cache = m.prefill(inputs_embeds=e[:, :L0], width=70, key_pad=torch.zeros(4, L0, dtype=torch.bool))
    for k in range(1, 70 - L0 + 1):
        p = lengths + k - 1
        step = m.decode_step(p, cache, inputs_embeds=e[rows, p])
        assert torch.allclose(step, full_e[rows, p], atol=1e-5, rtol=1e-5)


def test_decode_step_rejects_what_the_cache_cannot_hold():
    m = tiny_model()
    x, _, _, _ = token_batch()
    with pytest.raises(ValueError, match="width 20 must be in"):
        m.prefill(x[:, :30], width=20)
    _, cache = m.prefill(x[:, :30], width=31)
    with pytest.raises(ValueError, match="past the cache's width 31"):
        m.decode_step(torch.tensor([31, 30, 30, 30]), cache, x[:, 30])
    with pytest.raises(ValueError, match="exactly one of idx and inputs_embeds"):
        m.decode_step(torch.tensor([30] * 4), cache)
    assert generate(m, x[:, :30], 0).shape == (4, 0)


def test_generate_on_a_shipped_model_matches_the_manual_loop():
    """A trained model (the shipped SSFT checkpoint) on 48 real unsafe prompts: the cached batched
    decoding emits, token for token, what one-sample full-recompute greedy decoding emits."""
    from pysafe.lab import ckpt as C
    from pysafe.lab.config import DEMO_DIR
    from pysafe.lab.data import DataRecipe
    from pysafe.lab.inputs import group_inputs

    m, cfg = C.load_checkpoint(DEMO_DIR / "ssft_lr1em3")
    m.eval()
    x, s = group_inputs(DataRecipe.from_dict(cfg["data"]), 48, sets=())["std_unsafe"]
    x, s = torch.as_tensor(x).long(), torch.as_tensor(s).long()
    got = generate(m, x, 30, lengths=s + 1)
    for b in range(48):
        assert torch.equal(got[b], _manual_greedy(m, x[b, :s[b] + 1], 30)), b

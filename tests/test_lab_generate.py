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

"""Tiny lab models and token batches shared by the lab's test files (not collected: no test_ prefix)."""

from __future__ import annotations

import torch

from pysafe.lab.model import GPT, GPTConfig

TINY = GPTConfig(n_layer=2, n_head=2, d_model=32)  # two layers: enough for every hook and the block types
TINY1 = GPTConfig(n_layer=1, n_head=2, d_model=32)  # one layer: the training tests' model
PAD, EOT = 20, 16


def tiny_model(cfg=TINY, seed=0, wte_std=None):
    """A seeded GPT in eval mode; ``wte_std`` redraws the token embeddings (trained ones are far larger than the
    0.02 init)."""
    torch.manual_seed(seed)
    m = GPT(cfg)
    if wte_std is not None:
        with torch.no_grad():
            m.transformer.wte.weight.normal_(0, wte_std)
    return m.eval()


def token_batch(B=4, seed=0, lens=(25, 30, 35, 28)):
    """Layout of lab.md §1.4 (y-shifted): BOS, 4 operators, SOT, text, EOT, answer (2L+2), PAD."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((B, 159), PAD)
    y = torch.full((B, 159), PAD)
    L = torch.tensor(lens[:B])
    s = L + 6
    for b in range(B):
        x[b, 0] = 17
        x[b, 1:5] = torch.randint(0, 10, (4,), generator=g)
        x[b, 5] = 19
        x[b, 6:6 + L[b]] = torch.randint(22, 52, (int(L[b]),), generator=g)
        x[b, s[b]] = EOT
        A = int(2 * L[b] + 2)
        ans = torch.randint(22, 52, (A,), generator=g)
        x[b, s[b] + 1:s[b] + 1 + A] = ans
        y[b, s[b]:s[b] + A] = ans
    return x, y, s, L


class Interrupted(Exception):
    """Raised inside a training run by :func:`train_until` (the run stops as a crash would stop it)."""


def train_until(step: int, stage, out, **kwargs):
    """``lab.train.train(stage, out, **kwargs)`` stopped right after optimizer step ``step``; asserts that it
    was stopped there."""
    import pytest

    from pysafe.lab.train import train

    def interrupt(done, total, running):
        if done == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(stage, out, progress=interrupt, **kwargs)

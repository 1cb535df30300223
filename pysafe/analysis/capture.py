"""Activation capture for the analyses: named hook points, position selectors, pooled features.

Hook points (docs/analyses.md; ``pysafe.lab.model.HOOKS``): ``resid_pre``, ``attn_out``, ``mlp_in`` (the
input the first MLP matrix multiplies), ``mlp_pre``, ``mlp_act`` (all hidden units: the reference kept
only the first 192 of 768, bug B-series), ``mlp_out``, ``resid_post``.

Position selectors, relative to a sample's EOT position s (the last prompt token):

- ``eot``: position s;
- ``window``: the mean over s .. s+n−1 (EOT and the first n−1 answer tokens, teacher-forced; the
  reference's W(s) with n = 10);
- ``prompt_mean``: the mean over the prompt, positions 0 .. s;
- ``last``: the last position fed to the model (s+n−1 for sequences with an answer, s for bare prompts).

The input is cut after the last position a selector needs (the model is causal, so nothing after it can
change the features), batches run under ``torch.inference_mode``, and only the pooled [N, layers, D]
features are kept.
"""

from __future__ import annotations

import numpy as np
import torch

from pysafe.lab.model import HOOKS, eval_mode

POSITIONS = ("eot", "window", "prompt_mean", "last")


def _check(hook: str, positions: str, n_window: int) -> None:
    if hook not in HOOKS:
        raise ValueError(f"unknown hook point {hook!r}; known: {', '.join(HOOKS)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown position selector {positions!r}; known: {', '.join(POSITIONS)}")
    if n_window < 1:
        raise ValueError(f"the window needs at least one position, got {n_window}")


def pooling_weights(start_idx: np.ndarray, T: int, positions: str, n_window: int = 10) -> np.ndarray:
    """[N, T] weights (rows sum to 1) that pool a feature over the selected positions."""
    s = np.asarray(start_idx, dtype=np.int64)
    pos = np.arange(T)[None, :]
    if positions == "eot":
        sel = pos == s[:, None]
    elif positions == "window":
        sel = (pos >= s[:, None]) & (pos < s[:, None] + n_window)
    elif positions == "prompt_mean":
        sel = pos <= s[:, None]
    elif positions == "last":
        sel = pos == np.minimum(s + n_window - 1, T - 1)[:, None]
    else:
        raise ValueError(f"unknown position selector {positions!r}")
    w = sel.astype(np.float32)
    return w / w.sum(1, keepdims=True)


def needed_length(start_idx, positions: str, n_window: int = 10) -> int:
    s = int(np.max(start_idx)) if len(start_idx) else 0
    return s + 1 if positions in ("eot", "prompt_mean") else s + n_window


@torch.inference_mode()
def lab_features(model, x, start_idx, *, hook: str = "mlp_act", positions: str = "window", n_window: int = 10,
                 batch_size: int = 256, device="cpu", embeds: torch.Tensor | None = None) -> np.ndarray:
    """Pooled features of a lab model at ``hook`` for every layer: float32 [N, n_layer, D].

    Args:
        model: a lab :class:`~pysafe.lab.model.GPT`.
        x: uint8/int token ids [N, T] in the y-shifted layout (prompt, then the teacher-forced answer).
        start_idx: [N] EOT positions.
        embeds: optional token embeddings [N, T, D] used instead of ``wte(x)`` (attacked inputs); ``x``
            then only gives the PAD mask.
    """
    _check(hook, positions, n_window)
    x = np.asarray(x)
    s = np.asarray(start_idx, dtype=np.int64)
    N = x.shape[0]
    chunks = []
    with eval_mode(model):
        for lo in range(0, N, batch_size):
            sl = slice(lo, lo + batch_size)
            T = min(x.shape[1], needed_length(s[sl], positions, n_window))
            ids = torch.from_numpy(x[sl, :T].astype(np.int64)).to(device)
            if embeds is None:
                _, cap = model(ids, capture=[hook])
            else:
                _, cap = model(inputs_embeds=embeds[sl, :T].to(device), capture=[hook], key_pad=ids == 20)
            w = torch.from_numpy(pooling_weights(s[sl], T, positions, n_window)).to(device)
            pooled = [torch.einsum("bt,btd->bd", w, h.float()) for h in cap[hook]]
            chunks.append(torch.stack(pooled, 1).cpu().numpy())
    if not chunks:
        return np.zeros((0, model.config.n_layer, 0), np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)

"""Batched greedy generation from a lab model, after token ids or after (attacked) token embeddings."""

from __future__ import annotations

import torch

from pysafe.lab.model import eval_mode
from pysafe.lab.vocab import PAD


@torch.no_grad()
def _greedy(model, buf: torch.Tensor, lengths: torch.Tensor, n_new: int, embeds: bool) -> torch.Tensor:
    """Greedy decoding of left-aligned prompts of different lengths in one batch.

    One pass over the prompts fills a key/value cache (:meth:`GPT.prefill`); then each step feeds every
    sample's last token at its own position (:meth:`GPT.decode_step`). The model is causal, so what the
    buffer holds after a sample's prompt never changes its logits, and a shorter prompt's continuation
    overwrites those cache positions before anything attends to them.
    """
    B = buf.shape[0]
    out = torch.full((B, n_new), PAD, dtype=torch.long, device=buf.device)
    if n_new == 0:
        return out
    L0 = int(lengths.max())
    width = L0 + n_new - 1  # the last token fed sits at L0 + n_new - 2
    if embeds:
        logits, cache = model.prefill(inputs_embeds=buf[:, :L0], width=width,
                                      key_pad=torch.zeros(B, L0, dtype=torch.bool, device=buf.device))
    else:
        logits, cache = model.prefill(buf[:, :L0], width=width)
    nxt = logits[torch.arange(B, device=buf.device), lengths - 1].argmax(-1)
    out[:, 0] = nxt
    wte = model.transformer.wte
    for k in range(1, n_new):
        pos = lengths + k - 1
        logits = (model.decode_step(pos, cache, inputs_embeds=wte(nxt)) if embeds
                  else model.decode_step(pos, cache, nxt))
        nxt = logits.argmax(-1)
        out[:, k] = nxt
    return out


def _prepare(model, lengths, B, T, n_new, device):
    lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
    if lengths.shape != (B,) or (lengths < 1).any() or (lengths > T).any():
        raise ValueError(f"lengths must be {B} values in [1, {T}]")
    limit = model.config.block_size
    if int(lengths.max()) + n_new - 1 > limit:
        raise ValueError(f"prompt length {int(lengths.max())} + {n_new} new tokens exceeds block_size {limit}")
    return lengths.to(device)


def generate(model, prompt_ids, n_new: int, lengths=None) -> torch.LongTensor:
    """Batched greedy generation of ``n_new`` tokens after each prompt.

    Args:
        prompt_ids: LongTensor[B, T] of left-aligned prompts (with ``lengths``, tokens past a prompt's
            length are ignored), or a list of 1-D LongTensors of different lengths.
        lengths (LongTensor[B]): prompt lengths; default T for every row.

    Returns:
        LongTensor[B, n_new] on the model's device.
    """
    dev = model.transformer.wte.weight.device
    if isinstance(prompt_ids, (list, tuple)):
        lengths = torch.tensor([len(p) for p in prompt_ids])
        T = int(lengths.max())
        ids = torch.full((len(prompt_ids), T), PAD, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, :len(p)] = torch.as_tensor(p).long().cpu()
        prompt_ids = ids
    B, T = prompt_ids.shape
    lengths = _prepare(model, lengths, B, T, n_new, dev)
    W = int(lengths.max()) + n_new
    buf = torch.full((B, W), PAD, dtype=torch.long, device=dev)
    keep = torch.arange(min(T, W), device=dev)[None, :] < lengths[:, None]
    buf[:, :min(T, W)] = torch.where(keep, prompt_ids[:, :W].to(dev).long(), PAD)
    with eval_mode(model):
        return _greedy(model, buf, lengths, n_new, embeds=False)


def generate_from_embeds(model, embeds: torch.Tensor, n_new: int, lengths=None) -> torch.LongTensor:
    """Greedy generation after prompts given as token embeddings (positions are added by the model).

    Args:
        embeds (float[B, T, D]): left-aligned prompt embeddings; rows past ``lengths[b]`` are ignored.
        lengths (LongTensor[B]): prompt lengths; default T.

    Returns:
        LongTensor[B, n_new]: each generated token is fed back as ``wte(token)``.
    """
    dev = model.transformer.wte.weight.device
    B, T, D = embeds.shape
    lengths = _prepare(model, lengths, B, T, n_new, dev)
    W = int(lengths.max()) + n_new
    buf = torch.zeros(B, W, D, dtype=embeds.dtype, device=dev)
    keep = torch.arange(min(T, W), device=dev)[None, :, None] < lengths[:, None, None]
    buf[:, :min(T, W)] = embeds[:, :W].detach().to(dev) * keep
    with eval_mode(model):
        return _greedy(model, buf, lengths, n_new, embeds=True)

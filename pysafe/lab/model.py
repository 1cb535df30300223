"""The lab model: the minGPT variant of Jain et al. (docs/lab.md), nothing else.

``block="reference"`` reproduces the reference block exactly (docs/analyses.md). With residual input r:

    h  = LN1(r)            # replaces the stream: the residual r is dropped
    a  = Attn(h)           # after its own attn.c_proj
    m  = h + a             # the true MLP input (no LayerNorm in front of the MLP)
    p  = c_fc(m)           # MLP pre-activation
    g  = GELU_tanh(p)
    o  = c_proj(g)
    r' = m + o

``ln_2`` is constructed but unused in the reference block. It is kept on purpose: the parameter names and
the paper's parameter count (2,692,224 with lm_head) include it, and the pre-LN option uses it.
``block="preln"`` is the standard pre-LN block: r' = (r + Attn(LN1 r)) + MLP(LN2(r + Attn(LN1 r))).

Names follow minGPT and the reference checkpoints (without DataParallel's ``module.`` prefix); the MLP
sits directly on the block (``transformer.h.{i}.c_fc``), not under ``mlp.``. The sinusoidal position
table is a non-persistent buffer: it is a pure function of the config, so it is not saved.

Hook points (docs/analyses.md) are read with ``forward(..., capture={"mlp_in", ...})``; without
``capture`` the forward pass does no extra work.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pysafe.lab.vocab import PAD

BLOCKS = ("reference", "preln")
POSITIONS = ("sinusoidal", "learned")
HOOKS = ("resid_pre", "attn_out", "mlp_in", "mlp_pre", "mlp_act", "mlp_out", "resid_post")


@dataclass
class GPTConfig:
    """Architecture of a lab model. Defaults are the paper's ``wrn2-cfg-mini`` (docs/lab.md)."""

    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads; head dim = d_model / n_head (32 in the paper)
    d_model: int = 192  # residual stream width (minGPT's n_embd)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model (the reference's scale_internal)
    vocab_size: int = 59  # the one lab vocabulary; lm_head is untied
    block_size: int = 159  # context: x = seq[0:159]
    block: str = "reference"  # "reference" (LN1 replaces the stream, ln_2 unused) or "preln"
    pad_mask: bool = False  # mask PAD keys out of attention (the reference attends to PAD)
    dropout: float = 0.0  # the reference scripts set every rate to 0
    pos: str = "sinusoidal"  # "sinusoidal" (fixed table, the reference's 'pe') or "learned"

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "mlp_ratio", "vocab_size", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, found {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.block not in BLOCKS:
            raise ValueError(f"GPTConfig.block must be one of {', '.join(BLOCKS)}, found {self.block!r}")
        if self.pos not in POSITIONS:
            raise ValueError(f"GPTConfig.pos must be one of {', '.join(POSITIONS)}, found {self.pos!r}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"GPTConfig: sinusoidal positions need an even d_model, found {self.d_model}")
        if not isinstance(self.pad_mask, bool):
            raise ValueError(f"GPTConfig.pad_mask must be true or false, found {self.pad_mask!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), found {self.dropout!r}")


def sinusoidal_table(T: int, d: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same); float32 [T, d]."""
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(T, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.float()


class SinusoidalPE(nn.Module):
    """The reference's fixed table (``transformer.wpe.pe``), here a non-persistent buffer."""

    def __init__(self, T: int, d: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(T, d), persistent=False)

    def forward(self, T: int) -> torch.Tensor:
        return self.pe[:T]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q | k | v
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: list | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if kv is not None:  # the keys and values, for a decoding cache (GPT.prefill)
            kv.append((k, v))
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # mask: bool (B, 1, T, T), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def decode(self, x: torch.Tensor, pos: torch.Tensor, cache: "KVCache", layer: int) -> torch.Tensor:
        """One new position per sample: x (B, C) at positions ``pos`` (B,); its key and value go into
        ``cache`` at ``pos`` and its query attends to the cache's keys at positions <= pos (and not PAD
        keys other than itself, with ``pad_mask``)."""
        B, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=1)
        rows = torch.arange(B, device=x.device)
        kc, vc = cache.k[layer], cache.v[layer]  # (B, nh, W, hd)
        kc[rows, :, pos] = k.view(B, self.n_head, hd)
        vc[rows, :, pos] = v.view(B, self.n_head, hd)
        y = F.scaled_dot_product_attention(q.view(B, self.n_head, 1, hd), kc, vc,
                                           attn_mask=cache.attend(pos)[:, None, None, :])
        return self.c_proj(y.reshape(B, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.reference = cfg.block == "reference"
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)  # unused by the reference block (kept for names and count)
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _fast(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The block without hook points; ``attend(h)`` is the attention sublayer on its input h."""
        if self.reference:
            x = self.ln_1(x)
            x = x + attend(x)
            return x + self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))
        x = x + attend(self.ln_1(x))
        return x + self.drop(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cap: dict | None = None,
                kv: list | None = None) -> torch.Tensor:
        if cap is None:  # the fast path
            return self._fast(x, lambda h: self.attn(h, mask, kv))
        r = x
        if self.reference:
            h = self.ln_1(r)
            a = self.attn(h, mask, kv)
            m = h + a
            mlp_in = m
        else:
            a = self.attn(self.ln_1(r), mask, kv)
            m = r + a
            mlp_in = self.ln_2(m)
        p = self.c_fc(mlp_in)
        g = F.gelu(p, approximate="tanh")
        o = self.drop(self.c_proj(g))
        out = m + o
        vals = {"resid_pre": r, "attn_out": a, "mlp_in": mlp_in, "mlp_pre": p, "mlp_act": g, "mlp_out": o,
                "resid_post": out}
        for name, lst in cap.items():
            lst.append(vals[name])
        return out

    def decode(self, x: torch.Tensor, pos: torch.Tensor, cache: "KVCache", layer: int) -> torch.Tensor:
        """:meth:`forward` for one new position per sample (x: (B, C)), attending through ``cache``."""
        return self._fast(x, lambda h: self.attn.decode(h, pos, cache, layer))


class GPT(nn.Module):
    """The lab transformer. ``GPT(GPTConfig())`` is the paper's model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.d_model),
            wpe=SinusoidalPE(c.block_size, c.d_model) if c.pos == "sinusoidal" else nn.Embedding(c.block_size, c.d_model),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(c.d_model),
        ))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # untied
        self.apply(self._init_weights)
        # Both c_proj matrices (attention output and MLP output) get the GPT-2 residual scaling.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """All trainable parameters, lm_head included (the reference prints the count without it)."""
        return sum(p.numel() for p in self.parameters())

    def positions(self, T: int) -> torch.Tensor:
        wpe = self.transformer.wpe
        if isinstance(wpe, SinusoidalPE):
            return wpe(T)
        return wpe.weight[:T]

    def forward(self, idx: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, capture=None, key_pad: torch.Tensor | None = None,
                kv: list | None = None):
        """Run the model.

        Args:
            idx (LongTensor[B, T]): token ids, T <= block_size. Exactly one of ``idx`` and ``inputs_embeds``.
            inputs_embeds (Tensor[B, T, d_model]): token embeddings to use instead of ``wte(idx)``
                (the soft-token attack); positions are still added here.
            targets (LongTensor[B, T]): next-token targets; PAD (20) is ignored.
            capture: hook-point names (a subset of ``HOOKS``) to return, per layer.
            key_pad (BoolTensor[B, T]): with ``pad_mask``, which positions are PAD keys. Derived from
                ``idx`` when omitted; with ``inputs_embeds`` and no ``key_pad`` nothing is masked.
            kv: a list that receives each layer's attention keys and values ``(k, v)``, each
                (B, n_head, T, head_dim), in layer order (:meth:`prefill` builds its cache from them).

        Returns:
            ``logits`` (float[B, T, V]); ``(logits, loss)`` when ``targets`` is given; with ``capture``,
            a dict ``name -> [Tensor[B, T, D] per layer]`` is appended to the tuple.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT.forward: pass exactly one of idx and inputs_embeds")
        tok = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = tok.shape
        if T > self.config.block_size:
            raise ValueError(f"GPT.forward: sequence length {T} exceeds block_size {self.config.block_size}")
        x = self.transformer.drop(tok + self.positions(T).to(tok.dtype))

        mask = None
        if self.config.pad_mask:
            if key_pad is None and idx is not None:
                key_pad = idx == PAD
            if key_pad is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                # PAD keys are masked; a position always sees itself, so no row is fully masked
                # (the EOS target is predicted from a PAD position).
                keep = ~key_pad[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=x.device)
                mask = causal & keep

        cap = None
        if capture:
            unknown = sorted(set(capture) - set(HOOKS))
            if unknown:
                raise ValueError(f"GPT.forward: unknown hook point(s) {', '.join(unknown)}; known: {', '.join(HOOKS)}")
            cap = {name: [] for name in capture}
        for block in self.transformer.h:
            x = block(x, mask, cap, kv)
        logits = self.lm_head(self.transformer.ln_f(x))

        out = (logits,)
        if targets is not None:
            out += (F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD),)
        if cap is not None:
            out += (cap,)
        return out[0] if len(out) == 1 else out

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                key_pad: torch.Tensor | None = None, width: int) -> tuple[torch.Tensor, "KVCache"]:
        """Run the prompts (as :meth:`forward`) and keep every layer's keys and values for decoding.

        Returns the prompts' logits (B, T, V) and a :class:`KVCache` of ``width`` >= T positions whose
        first T hold the prompts'. Each sample then continues at its own position with
        :meth:`decode_step`; a sample whose prompt is shorter than T overwrites the positions after its
        end as it goes (what the prompt buffer held there is never attended to).
        """
        kv: list = []
        logits = self.forward(idx, inputs_embeds=inputs_embeds, key_pad=key_pad, kv=kv)
        B, T = logits.shape[:2]
        if not T <= width <= self.config.block_size:
            raise ValueError(f"GPT.prefill: width {width} must be in [{T}, block_size {self.config.block_size}]")
        pad = None
        if self.config.pad_mask:
            pad = torch.zeros(B, width, dtype=torch.bool, device=logits.device)
            if key_pad is None and idx is not None:
                key_pad = idx == PAD
            if key_pad is not None:
                pad[:, :T] = key_pad
        cache = KVCache(width, pad)
        for k, v in kv:
            kc = k.new_zeros(B, k.shape[1], width, k.shape[3])
            vc = v.new_zeros(B, v.shape[1], width, v.shape[3])
            kc[:, :, :T], vc[:, :, :T] = k, v
            cache.k.append(kc)
            cache.v.append(vc)
        return logits, cache

    @torch.no_grad()
    def decode_step(self, pos: torch.Tensor, cache: "KVCache", idx: torch.Tensor | None = None, *,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits (B, V) after one new token per sample, sample b's at position ``pos[b]``.

        Args:
            pos (LongTensor[B]): each sample's position; the cache must hold its positions < pos[b].
            cache: from :meth:`prefill`; updated in place with the new keys and values.
            idx (LongTensor[B]) or inputs_embeds (Tensor[B, d_model]): the new tokens (exactly one).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT.decode_step: pass exactly one of idx and inputs_embeds")
        if int(pos.max()) >= cache.width:
            raise ValueError(f"GPT.decode_step: position {int(pos.max())} is past the cache's width {cache.width}")
        tok = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        if cache.key_pad is not None:  # a generated PAD is a PAD key, as forward() would mask it
            rows = torch.arange(tok.shape[0], device=tok.device)
            cache.key_pad[rows, pos] = (idx == PAD) if idx is not None else False
        x = self.transformer.drop(tok + self.positions(cache.width).to(tok.dtype)[pos])
        for layer, block in enumerate(self.transformer.h):
            x = block.decode(x, pos, cache, layer)
        return self.lm_head(self.transformer.ln_f(x))

    def configure_optimizers(self, weight_decay: float, lr: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW; matrices (p.dim() >= 2) decayed, biases and LayerNorm weights not.

        The token embedding (and a learned position table) is *not* decayed although it is 2-D: the
        reference puts embedding weights in the no-decay group, as minGPT does.
        """
        no_decay_names = {"transformer.wte.weight", "transformer.wpe.weight"}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and name not in no_decay_names else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


class KVCache:
    """Each layer's attention keys and values, (B, n_head, width, head_dim), for greedy decoding
    (:meth:`GPT.prefill`, :meth:`GPT.decode_step`); ``key_pad`` (B, width) marks the PAD keys a
    ``pad_mask`` model does not attend to (None without ``pad_mask``)."""

    def __init__(self, width: int, key_pad: torch.Tensor | None):
        self.width = int(width)
        self.key_pad = key_pad
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def attend(self, pos: torch.Tensor) -> torch.Tensor:
        """Which keys (B, width) the query at each sample's position ``pos`` sees: the causal ones, less
        the PAD keys other than itself (what :meth:`GPT.forward`'s mask allows)."""
        col = torch.arange(self.width, device=pos.device)[None, :]
        ok = col <= pos[:, None]
        if self.key_pad is not None:
            ok &= ~self.key_pad | (col == pos[:, None])
        return ok


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, frozen: bool = False):
    """Run a block with ``model.eval()`` and, when ``frozen``, with every parameter's ``requires_grad``
    off (gradients flow to the inputs only). Restores the training flag and each parameter's flag when
    the block ends, however it ends. Works for any ``torch.nn.Module``."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()] if frozen else None
    model.eval()
    if frozen:
        model.requires_grad_(False)
    try:
        yield model
    finally:
        if flags is not None:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
        model.train(was_training)

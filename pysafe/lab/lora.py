"""Low-rank (LoRA-style) fine-tuning of a lab model: W = W₀ + (α / r)·B·A on chosen linear layers.

Only the factors A (r × in) and B (out × r) train; every other parameter is frozen. B starts at zero, so
the model starts exactly at W₀, and A from a seeded Gaussian with standard deviation 1/√in (Hu et al.,
2021, initialise A randomly and B at zero). The checkpoint a run writes holds the merged weights
W₀ + (α / r)·B·A (a plain model, which ``pysafe analyze`` and ``drift`` read); the factors themselves go
into the resume state so that an interrupted run continues with them.

Targets: ``"mlp"`` (each block's MLP matrices ``transformer.h.N.c_fc`` and ``transformer.h.N.c_proj``, the
ones the paper studies) or ``"all"`` (also the attention's ``attn.c_attn`` and ``attn.c_proj``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGETS = {"mlp": re.compile(r"(^|\.)h\.\d+\.(c_fc|c_proj)$"),
           "all": re.compile(r"(^|\.)h\.\d+\.((attn\.)?c_proj|c_fc|attn\.c_attn)$")}


class LowRankDelta(nn.Module):
    """The parametrisation W ↦ W + scale·B·A of one weight matrix."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = float(scale)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.scale * (self.B @ self.A)


def target_modules(model: nn.Module, targets: str) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs of ``model`` that ``targets`` selects, in model order."""
    if targets not in TARGETS:
        raise ValueError(f"lora targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    pattern = TARGETS[targets]
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not found:
        raise ValueError(f"the model has no linear layer matching lora targets {targets!r} ({pattern.pattern})")
    return found


def apply_lora(model: nn.Module, rank: int, *, targets: str = "mlp", alpha: float | None = None,
               seed: int = 0) -> list[str]:
    """Freeze ``model`` and add a trainable rank-``rank`` delta to each target layer; returns their names.

    ``alpha`` defaults to ``rank`` (scale 1)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    scale = (rank if alpha is None else float(alpha)) / rank
    names = []
    for name, lin in target_modules(model, targets):
        out_f, in_f = lin.weight.shape
        if rank > min(out_f, in_f):
            raise ValueError(f"lora rank {rank} exceeds the size of {name}.weight {list(lin.weight.shape)}")
        delta = LowRankDelta(out_f, in_f, rank, scale, gen).to(lin.weight.device)
        parametrize.register_parametrization(lin, "weight", delta)
        names.append(name)
    return names


def _deltas(model: nn.Module):
    """(layer name, its :class:`LowRankDelta`) of every parametrised layer of ``model``."""
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LowRankDelta):
                    yield name, p


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` of every parametrised layer (copies, on the CPU)."""
    out = {}
    for name, p in _deltas(model):
        out[f"{name}.lora_A"] = p.A.detach().cpu().clone()
        out[f"{name}.lora_B"] = p.B.detach().cpu().clone()
    return out


def load_lora_factors(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Copy saved factors (:func:`lora_factors`) into a model prepared by :func:`apply_lora`."""
    mine = {}
    for name, p in _deltas(model):
        mine[f"{name}.lora_A"], mine[f"{name}.lora_B"] = p.A, p.B
    if set(mine) != set(factors):
        raise ValueError(f"saved LoRA factors {sorted(factors)} do not match the model's {sorted(mine)}")
    with torch.no_grad():
        for k, t in factors.items():
            if tuple(t.shape) != tuple(mine[k].shape):
                raise ValueError(f"LoRA factor {k}: saved shape {list(t.shape)}, the model's {list(mine[k].shape)}")
            mine[k].copy_(t)


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every parametrised weight replaced by its merged value, under the plain
    parameter names (``blocks.0.mlp.c_fc.weight``), as an un-parametrised model would have it."""
    state = {}
    for name, t in model.state_dict().items():
        if ".parametrizations." in name:
            continue
        state[name] = t
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            state[f"{name}.weight"] = m.weight.detach().clone()
    return state

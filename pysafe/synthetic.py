"""Synthetic Llama-shaped checkpoint pairs for demos, tests and benchmarks.

``make_pair(out, preset)`` writes ``out/base`` and ``out/tuned``: HF-Llama names, bf16, sharded with
``model.safetensors.index.json`` (the two sides with different shard sizes, so pairing by shard would
fail), and a planted ΔW in the MLP and attention matrices: low rank (``delta_rank``) by default, or
full rank with a power-law spectrum σ_i ∝ i^-A (``delta_spectrum="powerlaw:A"``). W_base is a Gaussian matrix
plus a small decaying rank-64 part by default (``base_spectrum="gaussian"``: a flat spectrum near the top, the
worst case for iterative SVDs), or full rank with σ_i ∝ i^-A (``base_spectrum="powerlaw:A"``: heavy-tailed,
as the empirical spectra of trained LLM weights are). The tuned side is stored as
bf16(bf16(base) + ΔW), as a real fine-tune saved in bf16 is, so ΔW also carries bf16 rounding noise.
Generated tensor by tensor: memory stays at about one shard per side.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (64, 176, 2, 4, 4, 256),
    "small": (512, 1376, 4, 8, 8, 4096),
    "medium": (2048, 5504, 4, 16, 16, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
}


@dataclass
class PairSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    delta_rank: int = 8            # rank of the planted ΔW per matrix
    delta_spectrum: str = "lowrank"  # "lowrank" (rank delta_rank) or "powerlaw:A": full rank, σ_i ∝ i^-A
    delta_scale: float = 0.02      # ‖ΔW‖_F / ‖W_base‖_F of the planted part
    base_rank: int = 64            # rank of the structured part of W_base (the rest is Gaussian)
    base_spectrum: str = "gaussian"  # "gaussian" (+ the base_rank part) or "powerlaw:A": full rank, σ_i ∝ i^-A
    seed: int = 0
    base_shard_mb: int = 2000      # max shard size of the base side
    tuned_shard_mb: int = 3000     # ... and of the tuned side (different on purpose)


def delta_exponent(spectrum: str) -> float | None:
    """None for "lowrank", A for "powerlaw:A" (A > 0); ValueError naming the value otherwise."""
    if spectrum == "lowrank":
        return None
    kind, _, arg = spectrum.partition(":")
    try:
        a = float(arg)
    except ValueError:
        a = float("nan")
    if kind != "powerlaw" or not a > 0 or a == float("inf"):
        raise ValueError(f"delta spectrum must be 'lowrank' or 'powerlaw:A' with A > 0 (e.g. powerlaw:0.6), "
                         f"got {spectrum!r}")
    return a


def base_exponent(spectrum: str) -> float | None:
    """None for "gaussian", A for "powerlaw:A" (A > 0); ValueError naming the value otherwise."""
    if spectrum == "gaussian":
        return None
    if spectrum != "lowrank":
        try:
            return delta_exponent(spectrum)
        except ValueError:
            pass
    raise ValueError(f"base spectrum must be 'gaussian' or 'powerlaw:A' with A > 0 (e.g. powerlaw:1.0), "
                     f"got {spectrum!r}")


def spec_for(preset: str, **overrides) -> PairSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    h, i, n, a, kv, v = PRESETS[preset]
    shard = {"tiny": (0.05, 0.08), "small": (20, 30)}.get(preset, (2000, 3000))
    spec = PairSpec(h, i, n, a, kv, v, base_shard_mb=shard[0], tuned_shard_mb=shard[1])
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    delta_exponent(spec.delta_spectrum)
    base_exponent(spec.base_spectrum)
    return spec


def _tensors(spec: PairSpec):
    """(name, shape) in HF Llama order."""
    h, i, hd = spec.hidden, spec.intermediate, spec.hidden // spec.heads
    kvd = hd * spec.kv_heads
    yield "model.embed_tokens.weight", (spec.vocab, h)
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kvd, h)
        yield p + "self_attn.v_proj.weight", (kvd, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (spec.vocab, h)


class _ShardWriter:
    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.cur: dict = {}
        self.cur_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name, t):
        nb = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nb > self.max_bytes:
            self.flush()
        self.cur[name] = t
        self.cur_bytes += nb

    def flush(self):
        from safetensors.torch import save_file

        if not self.cur:
            return
        tmp = f"shard-{len(self.files):05d}.tmp"
        save_file(self.cur, str(self.out / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def close(self, config: dict):
        self.flush()
        n = len(self.files)
        weight_map, total = {}, 0
        for k, (tmp, names) in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            total += (self.out / final).stat().st_size
            for nm in names:
                weight_map[nm] = final
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.out / "config.json").write_text(json.dumps(config, indent=2))


def _existing_spec(out: Path):
    try:
        specs = [json.loads((out / side / "config.json").read_text())["pysafe_synthetic"]
                 for side in ("base", "tuned")]
    except (OSError, ValueError, KeyError):
        return None
    complete = all((out / side / "model.safetensors.index.json").exists() for side in ("base", "tuned"))
    for spec in specs:  # pairs written before base_spectrum existed have the default one
        spec.setdefault("base_spectrum", "gaussian")
    return specs[0] if complete and specs[0] == specs[1] else None


def make_pair(out: str | os.PathLike, preset: str = "small", **overrides) -> Path:
    """Write ``out/base`` and ``out/tuned`` for a preset (see PRESETS); returns ``out``."""
    import torch

    spec = spec_for(preset, **overrides)
    out = Path(out)
    if (out / "base").exists() or (out / "tuned").exists():
        if _existing_spec(out) == {"preset": preset, **asdict(spec)}:
            return out  # the same pair is already there: reuse it
        raise FileExistsError(f"{out}: already holds a different base/ or tuned/; choose an empty directory")
    alpha = delta_exponent(spec.delta_spectrum)
    beta = base_exponent(spec.base_spectrum)
    g = torch.Generator().manual_seed(spec.seed)
    bases: dict = {}  # powerlaw base: one pair of orthonormal factors per shape (QR of a Gaussian)
    wb = _ShardWriter(out / "base", int(spec.base_shard_mb * 1e6))
    wt = _ShardWriter(out / "tuned", int(spec.tuned_shard_mb * 1e6))
    for name, shape in _tensors(spec):
        if len(shape) == 1:
            base = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            tuned = base.clone()
        else:
            rows, cols = shape
            base32 = torch.randn(shape, generator=g).mul_(0.5 / cols ** 0.5)
            r = min(spec.base_rank, rows, cols)
            if beta is not None:
                # full rank, σ_i ∝ i^-β, the Gaussian's Frobenius norm; singular vectors from one QR per
                # shape, made distinct per matrix by signed row and column permutations
                d = min(rows, cols)
                if shape not in bases:
                    bases[shape] = (torch.linalg.qr(torch.randn(rows, d, generator=g))[0],
                                    torch.linalg.qr(torch.randn(cols, d, generator=g))[0])
                U0, V0 = bases[shape]
                U = U0[torch.randperm(rows, generator=g)] * (torch.randint(0, 2, (rows, 1), generator=g) * 2 - 1)
                V = V0[torch.randperm(cols, generator=g)] * (torch.randint(0, 2, (cols, 1), generator=g) * 2 - 1)
                sig = torch.arange(1, d + 1, dtype=torch.float32).pow_(-beta)
                fro = base32.norm()
                base32 = (U * sig) @ V.T
                base32.mul_(fro / base32.norm())
            elif r > 0 and "embed" not in name:
                # a decaying low-rank component, as trained weights have a few dominant directions
                s = torch.logspace(0, -1, r) * (2.0 / r ** 0.5)
                U = torch.linalg.qr(torch.randn(rows, r, generator=g))[0]
                V = torch.linalg.qr(torch.randn(cols, r, generator=g))[0]
                base32.addmm_(U * s, V.T)
            base = base32.to(torch.bfloat16)
            if "proj" in name:
                if alpha is None:
                    k = min(spec.delta_rank, rows, cols)
                    B = torch.randn(rows, k, generator=g)
                    A = torch.randn(k, cols, generator=g)
                    delta = B @ A
                else:  # full rank, σ_i = i^-α exactly (as a full fine-tune's ΔW decays slowly)
                    d = min(rows, cols)
                    U = torch.linalg.qr(torch.randn(rows, d, generator=g))[0]
                    V = torch.linalg.qr(torch.randn(cols, d, generator=g))[0]
                    sig = torch.arange(1, d + 1, dtype=torch.float32).pow_(-alpha)
                    delta = (U * sig) @ V.T
                delta.mul_(spec.delta_scale * base32.norm() / delta.norm())
                tuned = (base.float() + delta).to(torch.bfloat16)
            else:
                tuned = base.clone()
        wb.add(name, base)
        wt.add(name, tuned)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": spec.hidden,
              "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
              "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
              "torch_dtype": "bfloat16", "pysafe_synthetic": {"preset": preset, **asdict(spec)}}
    wb.close(config)
    wt.close(config)
    return out

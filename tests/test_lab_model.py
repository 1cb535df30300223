"""The lab model: parameter count and names, the reference and pre-LN blocks, causality, PAD masking,
init, hooks, optimizer groups, eval_mode."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from pysafe.lab.model import GPT, HOOKS, GPTConfig, eval_mode

from labkit import PAD, TINY, tiny_model


def test_paper_parameter_count_and_names():
    m = GPT(GPTConfig())
    assert m.num_params() == 2_692_224
    assert sum(p.numel() for n, p in m.named_parameters() if n != "lm_head.weight") == 2_680_896
    names = set(m.state_dict())
    for n in ("transformer.wte.weight", "transformer.h.5.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.0.attn.c_proj.bias", "transformer.h.3.ln_2.bias", "transformer.h.2.c_fc.weight",
              "transformer.h.2.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert n in names
    assert not any(n.startswith("module.") or ".mlp." in n or "wpe" in n for n in names)
    assert m.state_dict()["transformer.h.0.c_fc.weight"].shape == (768, 192)
    assert m.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (576, 192)


def _manual_reference_forward(m: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Independent re-implementation of lab.md §2 / analyses.md §0.1 from the raw parameters."""
    P = dict(m.named_parameters())
    cfg = m.config
    B, T = idx.shape
    d, H = cfg.d_model, cfg.n_head
    pe = torch.zeros(T, d)
    for pos in range(T):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    r = P["transformer.wte.weight"][idx] + pe

    def ln(v, pre):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * P[pre + ".weight"] + P[pre + ".bias"]

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    for li in range(cfg.n_layer):
        pre = f"transformer.h.{li}"
        h = ln(r, pre + ".ln_1")
        qkv = h @ P[pre + ".attn.c_attn.weight"].T + P[pre + ".attn.c_attn.bias"]
        q, k, v = qkv.split(d, dim=-1)
        hd = d // H
        q, k, v = (t.reshape(B, T, H, hd).permute(0, 2, 1, 3) for t in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf")).softmax(-1)
        a = (att @ v).permute(0, 2, 1, 3).reshape(B, T, d)
        a = a @ P[pre + ".attn.c_proj.weight"].T + P[pre + ".attn.c_proj.bias"]
        m_in = h + a
        o = gelu_tanh(m_in @ P[pre + ".c_fc.weight"].T + P[pre + ".c_fc.bias"]) @ P[pre + ".c_proj.weight"].T \
            + P[pre + ".c_proj.bias"]
        r = m_in + o
    return ln(r, "transformer.ln_f") @ P["lm_head.weight"].T


def test_reference_block_matches_manual_forward():
    m = tiny_model(wte_std=1.0)
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for n, p in m.named_parameters():
            if "ln" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 59, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), _manual_reference_forward(m, idx), rtol=1e-4, atol=1e-4)
        # ln_2 is dead in the reference block
        m.transformer.h[0].ln_2.weight.mul_(3.0)
        torch.testing.assert_close(m(idx), _manual_reference_forward(m, idx), rtol=1e-4, atol=1e-4)


def test_preln_block_differs_and_uses_ln2():
    ref = tiny_model()
    pre = GPT(GPTConfig(**{**asdict(TINY), "block": "preln"})).eval()
    pre.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 59, (2, 30))
    with torch.no_grad():
        a = pre(idx)
        assert not torch.allclose(a, ref(idx))
        pre.transformer.h[0].ln_2.weight.mul_(3.0)
        assert not torch.allclose(a, pre(idx))


@pytest.mark.parametrize("pad_mask", [False, True])
def test_causal(pad_mask):
    m = tiny_model(GPTConfig(**{**asdict(TINY), "pad_mask": pad_mask}), wte_std=1.0)
    idx = torch.randint(0, 59, (3, 50))
    idx2 = idx.clone()
    idx2[:, 30:] = torch.randint(0, 59, (3, 20))
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_pad_mask_hides_pad_keys():
    m_off = tiny_model(wte_std=1.0)
    m_on = GPT(GPTConfig(**{**asdict(TINY), "pad_mask": True})).eval()
    m_on.load_state_dict(m_off.state_dict())
    idx = torch.randint(22, 52, (2, 40))
    idx[:, 10:15] = PAD
    with torch.no_grad():
        on, off = m_on(idx), m_off(idx)
        # before the first PAD both agree; after it, only the masked model ignores the PADs ...
        torch.testing.assert_close(on[:, :10], off[:, :10], rtol=0, atol=1e-6)
        assert not torch.allclose(on[:, 20:], off[:, 20:])
        # ... so changing the PAD tokens' embeddings changes nothing at non-PAD positions
        m_on.transformer.wte.weight[PAD].add_(5.0)
        on2 = m_on(idx)
    keep = idx != PAD
    torch.testing.assert_close(on2[keep], on[keep], rtol=0, atol=1e-5)
    assert torch.isfinite(on2).all()


def test_init_stds():
    torch.manual_seed(0)
    m = GPT(GPTConfig())
    sd = m.state_dict()
    assert abs(float(sd["transformer.h.0.c_fc.weight"].std()) - 0.02) < 1e-3
    assert abs(float(sd["transformer.wte.weight"].std()) - 0.02) < 2e-3
    assert abs(float(sd["lm_head.weight"].std()) - 0.02) < 2e-3
    want = 0.02 / math.sqrt(2 * 6)
    assert abs(float(sd["transformer.h.1.c_proj.weight"].std()) - want) < 5e-4
    assert abs(float(sd["transformer.h.1.attn.c_proj.weight"].std()) - want) < 5e-4
    assert float(sd["transformer.h.1.c_fc.bias"].abs().max()) == 0.0
    assert torch.equal(sd["transformer.h.1.ln_1.weight"], torch.ones(192))


def test_forward_targets_capture_and_inputs_embeds():
    m = tiny_model(wte_std=1.0)
    idx = torch.randint(0, 59, (2, 30))
    tgt = idx.clone()
    tgt[:, :5] = PAD
    with torch.no_grad():
        logits = m(idx)
        l2, loss = m(idx, targets=tgt)
        l3, acts = m(idx, capture={"mlp_in", "mlp_act", "resid_post"})
        l4 = m(inputs_embeds=m.transformer.wte(idx))
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD))
    assert torch.equal(logits, l2) and torch.equal(logits, l3) and torch.equal(logits, l4)
    assert set(acts) == {"mlp_in", "mlp_act", "resid_post"}
    assert len(acts["mlp_act"]) == 2 and acts["mlp_act"][0].shape == (2, 30, 128)
    # mlp_act = GELU(c_fc(mlp_in)) at every layer
    blk = m.transformer.h[1]
    torch.testing.assert_close(acts["mlp_act"][1], F.gelu(blk.c_fc(acts["mlp_in"][1]), approximate="tanh"))
    with pytest.raises(ValueError, match="unknown hook"):
        m(idx, capture={"mlp_nope"})
    assert set(HOOKS) >= {"resid_pre", "attn_out", "mlp_in", "mlp_pre", "mlp_act", "mlp_out", "resid_post"}


def test_optimizer_groups():
    m = tiny_model()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in decay}
    assert "lm_head.weight" in names and "transformer.h.0.c_fc.weight" in names
    assert "transformer.wte.weight" not in names and not any(n.endswith("bias") for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_eval_mode_restores_training_and_grad_flags():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16))
    model.train()
    model.lm_head.weight.requires_grad_(False)  # a mixed pattern must come back as it was
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model, frozen=True):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert model.training and [p.requires_grad for p in model.parameters()] == before
    model.eval()
    with eval_mode(model):
        assert [p.requires_grad for p in model.parameters()] == before  # not frozen: flags untouched
    assert not model.training


def test_bad_config():
    with pytest.raises(ValueError, match="d_model"):
        GPTConfig(n_head=5)
    with pytest.raises(ValueError, match="block"):
        GPTConfig(block="post")

"""The lab model, presets, checkpoints and the soft-token attack (fast, CPU)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import pysafe
from pysafe.errors import CheckpointError, HeaderError, ShapeMismatchError, TensorNotFoundError
from pysafe.lab import ckpt as C
from pysafe.lab.attacks import attack_success, insert_soft_block, soft_token_attack
from pysafe.lab.generate import generate, generate_from_embeds
from pysafe.lab.config import PRESETS, load_preset
from pysafe.lab.model import GPT, HOOKS, GPTConfig, eval_mode

TINY = GPTConfig(n_layer=2, n_head=2, d_model=32)
PAD, EOT = 20, 16


def _model(cfg=TINY, seed=0, wte_std=None):
    torch.manual_seed(seed)
    m = GPT(cfg)
    if wte_std is not None:  # trained embeddings are far larger than the 0.02 init
        with torch.no_grad():
            m.transformer.wte.weight.normal_(0, wte_std)
    return m.eval()


def _batch(B=4, seed=0, lens=(25, 30, 35, 28)):
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


# -- model ----------------------------------------------------------------------------------------------
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
    m = _model(wte_std=1.0)
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
    ref = _model()
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
    m = _model(GPTConfig(**{**asdict(TINY), "pad_mask": pad_mask}), wte_std=1.0)
    idx = torch.randint(0, 59, (3, 50))
    idx2 = idx.clone()
    idx2[:, 30:] = torch.randint(0, 59, (3, 20))
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_pad_mask_hides_pad_keys():
    m_off = _model(wte_std=1.0)
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
    m = _model(wte_std=1.0)
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
    m = _model()
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


# -- presets ------------------------------------------------------------------------------------------
def test_presets_load(tmp_path):
    for name in PRESETS:
        cfg = load_preset(name)
        GPTConfig(**cfg["model"])
        assert cfg["name"] == name and {"pretrain", "finetune", "data", "eval"} <= set(cfg)
    paper = load_preset("paper")
    assert GPT(GPTConfig(**paper["model"])).num_params() == 2_692_224
    assert paper["pretrain"]["steps"] == 100_000 and paper["finetune"]["lr_max"] == 1e-4 and paper["eval"]["n"] == 2000
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "tiny"\n[pretrain]\nsteps = 7\n')
    cfg = load_preset(mine)
    assert cfg["pretrain"]["steps"] == 7 and cfg["pretrain"]["batch_size"] == 8 and cfg["name"] == "mine"
    mine.write_text('[pretrain]\nstepz = 7\n')
    with pytest.raises(ValueError, match=r"mine\.toml: \[pretrain\] has unknown key 'stepz'"):
        load_preset(mine)
    mine.write_text('[model]\nn_head = 5\nd_model = 32\n')
    with pytest.raises(ValueError, match=r"mine\.toml: \[model\]"):
        load_preset(mine)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_preset("nope")
    # [finetune] lrs: the rates `pysafe reproduce` fine-tunes at (default: the paper's two)
    from pysafe.lab.config import PAPER_LRS, preset_lrs, stage_settings

    assert preset_lrs("paper") == PAPER_LRS and preset_lrs("tiny") == PAPER_LRS
    mine.write_text('extends = "tiny"\n[finetune]\nlrs = [3e-4, 3e-5]\n')
    assert preset_lrs(mine) == (3e-4, 3e-5) and stage_settings(str(mine), "ssft").train.lr_max == 1e-4
    for bad in ("[]", "[0.0]", "[1e-4, -1]", '"1e-4"'):
        mine.write_text(f'[finetune]\nlrs = {bad}\n')
        with pytest.raises(ValueError, match=r"\[finetune\] lrs must be a non-empty list of positive numbers"):
            load_preset(mine)


def test_preset_per_stage_finetune_settings(tmp_path):
    """[finetune.<stage>] overrides [finetune] for that objective only; --steps keeps its schedule's shape."""
    from pysafe.lab.config import stage_settings

    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "tiny"\n[finetune]\nsteps = 100\nwarmup = 10\ndecay_steps = 80\n'
                    '[finetune.dpo]\nsteps = 300\nwarmup = 30\ndecay_steps = 240\nbatch_size = 4\n')
    ssft, dpo, unl = (stage_settings(str(mine), s).train for s in ("ssft", "dpo", "unlearn"))
    assert (ssft.steps, ssft.warmup, ssft.decay_steps) == (100, 10, 80)
    assert (unl.steps, unl.batch_size) == (100, ssft.batch_size)
    assert (dpo.steps, dpo.warmup, dpo.decay_steps, dpo.batch_size) == (300, 30, 240, 4)
    short = stage_settings(str(mine), "dpo", steps=150).train
    assert (short.steps, short.warmup, short.decay_steps) == (150, 15, 120)
    mine.write_text('extends = "tiny"\n[finetune.dpo]\nstep = 3\n')
    with pytest.raises(ValueError, match=r"\[finetune.dpo\] has unknown key 'step'"):
        load_preset(mine)
    mine.write_text('extends = "tiny"\n[finetune.sft]\nsteps = 3\n')
    with pytest.raises(ValueError, match=r"\[finetune\] has unknown key 'sft'"):
        load_preset(mine)


def test_preset_objective_options(tmp_path):
    """[objectives.<stage>] holds one safety objective's options: validated, merged through `extends`."""
    from pysafe.lab.config import stage_settings

    # cpu runs DPO at the reference's effective β (its 0.1 and 0.01 over the constant 159, lab.md §4)
    dpo = stage_settings("cpu", "dpo").objective
    assert dpo["beta"] == pytest.approx(0.1 / 159, rel=0.01) and dpo["beta_rejected"] == pytest.approx(0.01 / 159, rel=0.01)
    assert stage_settings("cpu", "ssft").objective == {} and stage_settings("cpu", "pretrain").objective == {}
    assert load_preset("paper")["objectives"] == {}  # the paper preset keeps D10's defaults
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "cpu"\n[objectives.dpo]\nbeta = 0.2\n[objectives.unlearn]\nforget = "npo"\n')
    cfg = load_preset(mine)
    assert cfg["objectives"]["dpo"] == {"beta": 0.2, "beta_rejected": 6.3e-5}  # merged key by key
    assert stage_settings(str(mine), "unlearn").objective == {"forget": "npo"}
    for text, msg in [
        ("[objectives.pretrain]\np_unsafe = 0.5\n", r"\[objectives\] has unknown stage 'pretrain'"),
        ("[objectives.dpo]\nbetta = 0.5\n", r"\[objectives\.dpo\] objective 'dpo' has no option betta"),
        ('[objectives.dpo]\nbeta = "0.1"\n', r"\[objectives\.dpo\] beta must be a number"),
        ("[objectives.dpo]\nbeta = 0\n", r"\[objectives\.dpo\] beta must be positive"),
        ("[objectives.ssft]\np_unsafe = 1.5\n", r"p_unsafe must be in \[0, 1\]"),
        ('[objectives.unlearn]\nforget = "ascend"\n', r"forget must be 'clamp' or 'npo'"),
        ("[objectives]\ndpo = 3\n", r"'objectives\.dpo' must be a table"),
    ]:
        mine.write_text(text)
        with pytest.raises(ValueError, match=r"mine\.toml: .*" + msg):
            load_preset(mine)


# -- checkpoints ----------------------------------------------------------------------------------------
def _trained_pair(tmp_path):
    torch.manual_seed(0)
    m = GPT(TINY)
    base = C.save_checkpoint(tmp_path / "base", m, {"stage": "pretrain", "seed": 0, "data": {"seed": 0}})
    opt = m.configure_optimizers(1e-4, 1e-2)
    x, y, _, _ = _batch()
    for _ in range(3):
        _, loss = m(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = C.save_checkpoint(tmp_path / "tuned", m, {"stage": "ssft", "seed": 0}, log_rows=[{"step": 3}],
                              train_state=C.make_train_state(opt, 3), command="pysafe train ssft")
    return m, opt, base, tuned


def test_checkpoint_bytes_depend_only_on_the_weights(tmp_path):
    """The safetensors library orders __metadata__ keys at random per call; pysafe's writer must not."""
    from safetensors import safe_open

    torch.manual_seed(0)
    m = GPT(TINY)
    files = [C.save_checkpoint(tmp_path / f"c{i}", m, {"stage": "pretrain", "seed": 0}) / "model.safetensors"
             for i in range(8)]
    first = files[0].read_bytes()
    assert all(f.read_bytes() == first for f in files[1:])
    n = int.from_bytes(first[:8], "little")
    assert n % 8 == 0 and first[8:8 + n].startswith(b'{"__metadata__":{"format":"pt","pysafe":')
    with safe_open(str(files[0]), "pt") as f:  # the reference reader agrees on metadata and tensors
        assert f.metadata() == {"format": "pt", "pysafe": C.FORMAT}
        for name, t in m.state_dict().items():
            assert torch.equal(f.get_tensor(name), t)
    native = pysafe.read_header(str(files[0]))  # and so does the native, strict reader
    assert native["metadata"] == {"format": "pt", "pysafe": C.FORMAT}
    assert sorted(e["name"] for e in native["entries"]) == sorted(m.state_dict())


def test_save_load_round_trip_and_analyze(tmp_path):
    m, opt, base, tuned = _trained_pair(tmp_path)
    m2, cfg = C.load_checkpoint(tuned, expect=TINY)
    for (n, a), (n2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n == n2 and torch.equal(a, b)
    assert cfg["model"] == asdict(TINY) and cfg["stage"] == "ssft" and len(cfg["vocabulary"]) == 59
    assert cfg["command"] == "pysafe train ssft" and cfg["pysafe_version"] == pysafe.__version__
    assert C.read_log(tuned) == [{"step": 3}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    # resume state: optimizer moments and RNG restored exactly
    opt2 = m2.configure_optimizers(1e-4, 1e-2)
    state = C.read_train_state(tuned)
    assert C.restore_train_state(state, opt2) == 3
    for i, st in opt.state_dict()["state"].items():
        assert torch.equal(st["exp_avg_sq"], opt2.state_dict()["state"][i]["exp_avg_sq"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)

    cmp = pysafe.compare(base, tuned)
    recs = {r["name"]: r for r in cmp.records}
    for li in range(2):
        for mod in ("attn.c_attn", "c_fc", "c_proj"):
            r = recs[f"transformer.h.{li}.{mod}.weight"]
            assert r["layer"] == li and r["delta_fro"] > 0


def test_rng_state_replays(tmp_path):
    m = _model()
    opt = m.configure_optimizers(0.0, 1e-3)
    state = C.make_train_state(opt, 0)
    C.save_checkpoint(tmp_path / "c", m, {}, train_state=state)
    r1 = torch.rand(5)
    C.load_train_state(tmp_path / "c", opt)
    assert torch.equal(torch.rand(5), r1)


def test_overwrite_is_explicit(tmp_path):
    m = _model()
    C.save_checkpoint(tmp_path / "c", m, {"stage": "a"})
    with pytest.raises(FileExistsError, match="overwrite"):
        C.save_checkpoint(tmp_path / "c", m, {"stage": "b"})
    C.save_checkpoint(tmp_path / "c", m, {"stage": "b"}, overwrite=True)
    assert C.read_config(tmp_path / "c")["stage"] == "b"
    with pytest.raises(ValueError, match="differs from the model"):
        C.save_checkpoint(tmp_path / "d", m, {"model": {"n_layer": 9}})
    assert not (tmp_path / "d").exists()


def test_load_errors(tmp_path):
    m = _model()
    d = C.save_checkpoint(tmp_path / "c", m, {"stage": "pretrain"})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        C.load_checkpoint(tmp_path / "nowhere")
    # wrong expected architecture
    with pytest.raises(CheckpointError, match=r"config\.json: model\.d_model is 32 but 64 was expected"):
        C.load_checkpoint(d, expect={"d_model": 64})
    # config.json says a wider model than the weights hold
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["mlp_ratio"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.c_fc\.weight' "
                                                 r"has shape \[128, 32\] but config\.json implies \[64, 32\]"):
        C.load_checkpoint(d)
    cfg["model"]["mlp_ratio"] = 4
    cfg["model"]["n_layer"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TensorNotFoundError, match=r"missing tensor 'transformer\.h\.2\.ln_1\.weight'"):
        C.load_checkpoint(d)
    cfg["model"]["n_layer"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.1\."):
        C.load_checkpoint(d)
    cfg["model"]["n_layer"] = 2
    cfg["model"]["colour"] = "red"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.colour is not a GPTConfig field"):
        C.load_checkpoint(d)
    del cfg["model"]["colour"]
    cfg["vocabulary"][3] = "x"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocabulary differs .* at id 3"):
        C.load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        C.load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        C.load_checkpoint(d)
    d2 = C.save_checkpoint(tmp_path / "e", m, {})
    (d2 / "model.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(HeaderError, match="model.safetensors"):
        C.load_checkpoint(d2)
    (d2 / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        C.load_checkpoint(d2)
    with pytest.raises(FileNotFoundError, match="cannot be resumed"):
        C.read_train_state(d2)


# -- attack and generation ------------------------------------------------------------------------------------
def test_insert_soft_block_layout():
    x, y, s, L = _batch()
    ids, y2, soft_start, new_s = insert_soft_block(x, y, s, 3)
    for b in range(4):
        sb = int(s[b])
        assert torch.equal(ids[b, :sb], x[b, :sb]) and (ids[b, sb:sb + 3] == 0).all()
        assert torch.equal(ids[b, sb + 3:], x[b, sb:159 - 3]) and ids[b, sb + 3] == EOT
        assert (y2[b, sb - 1:sb + 3] == PAD).all() and torch.equal(y2[b, sb + 3:], y[b, sb:159 - 3])
        assert torch.equal(y2[b, :sb - 1], y[b, :sb - 1])
    assert torch.equal(new_s, s + 3) and torch.equal(soft_start, s)
    bad = x.clone()
    bad[0, s[0]] = 22
    with pytest.raises(ValueError, match="must be EOT"):
        insert_soft_block(bad, y, s, 3)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attack_budget_positions_and_frozen_model(norm):
    m = _model(wte_std=1.0)
    m.train()
    for p in m.parameters():
        p.grad = None
    m.transformer.h[0].ln_2.weight.requires_grad_(False)  # a mixed requires_grad pattern is restored as it was
    flags = [p.requires_grad for p in m.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y, s, L = _batch()
    res = soft_token_attack(m, x, y, s, n_soft=3, n_steps=8, eps_factor=0.5, norm=norm)
    assert m.training and [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    if norm == "l2":
        letters = m.transformer.wte.weight[22:52].detach()
        assert res.eps == pytest.approx(0.5 * float(letters.norm(dim=1).mean()), rel=1e-6)
        assert float(res.soft.norm(dim=-1).max()) <= res.eps + 1e-6
    else:
        assert float(res.soft.abs().max()) <= res.eps + 1e-6
    # only the soft positions differ from the clean embeddings of the shifted sequence
    clean = m.transformer.wte(res.ids).detach()
    diff = (res.embeds - clean).abs().sum(-1) > 0
    for b in range(4):
        sb = int(s[b])
        assert not diff[b, :sb].any() and not diff[b, sb + 3:].any() and diff[b, sb:sb + 3].all()
        torch.testing.assert_close(res.embeds[b, sb:sb + 3], res.soft[b])
    assert res.lr == pytest.approx(2 * res.eps / 8)
    assert res.losses.shape == (9, 4)


def test_attack_overlay_placement():
    """overlay: nothing moves; δ (within the budget) is added to the n prompt tokens before EOT only, and
    success is scored at the original positions."""
    m = _model(wte_std=1.0)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 1.0)
    x, y, s, L = _batch()
    res = soft_token_attack(m, x, y, s, n_soft=3, n_steps=12, eps_factor=1.0, placement="overlay")
    assert res.placement == "overlay" and res.inserted == 0
    assert torch.equal(res.ids, x) and torch.equal(res.y, y) and torch.equal(res.start_idx, s)
    assert torch.equal(res.soft_start, s - 3)
    clean = m.transformer.wte(x).detach()
    diff = res.embeds - clean
    for b in range(4):
        sb = int(s[b])
        assert diff[b, :sb - 3].abs().max() == 0 and diff[b, sb:].abs().max() == 0
        torch.testing.assert_close(diff[b, sb - 3:sb], res.soft[b])
    assert float(res.soft.norm(dim=-1).max()) <= res.eps + 1e-6
    assert (res.losses[-1] < res.losses[0]).all()
    ok, gen = attack_success(m, res, y)
    want = generate_from_embeds(m, res.embeds, gen.shape[1], lengths=s + 1)
    for b in range(4):
        Lb = int(L[b])
        assert bool(ok[b]) == torch.equal(want[b, :Lb], y[b, s[b]:s[b] + Lb])
    with pytest.raises(ValueError, match="placement"):
        soft_token_attack(m, x, y, s, placement="middle")


def test_attack_loss_decreases():
    m = _model(wte_std=1.0)
    with torch.no_grad():  # a random model at init predicts ~uniformly; sharpen it so the attack has a signal
        m.lm_head.weight.normal_(0, 1.0)
    x, y, s, _ = _batch()
    res = soft_token_attack(m, x, y, s, n_soft=4, n_steps=20, eps_factor=2.0)
    assert (res.losses[-1] < res.losses[0] - 1e-3).all()
    # the reported loss is the model's answer cross-entropy on the attacked embeddings
    with torch.no_grad():
        logits = m(inputs_embeds=res.embeds)
    pos = torch.arange(159)[None, :]
    sel = (res.y != PAD) & (pos >= res.start_idx[:, None])
    ce = F.cross_entropy(logits.flatten(0, 1), res.y.flatten(), reduction="none").view(4, 159)
    torch.testing.assert_close((ce * sel).sum(1) / sel.sum(1), res.losses[-1], rtol=1e-4, atol=1e-4)
    # the same seed gives the same attack
    again = soft_token_attack(m, x, y, s, n_soft=4, n_steps=20, eps_factor=2.0)
    assert torch.equal(again.soft, res.soft)


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
    m = _model(GPTConfig(**{**asdict(TINY), "pad_mask": pad_mask}), wte_std=1.0)
    x, _, s, _ = _batch()
    prompts = [x[b, :s[b] + 1] for b in range(4)]
    got = generate(m, prompts, 12)
    got2 = generate(m, x, 12, lengths=s + 1)
    for b in range(4):
        want = _manual_greedy(m, prompts[b], 12)
        assert torch.equal(got[b], want) and torch.equal(got2[b], want)
    got3 = generate_from_embeds(m, m.transformer.wte(x).detach(), 12, lengths=s + 1)
    assert torch.equal(got3, got)


def test_attack_success_matches_generation():
    m = _model(wte_std=1.0)
    x, y, s, L = _batch()
    res = soft_token_attack(m, x, y, s, n_soft=2, n_steps=3)
    ok, gen = attack_success(m, res, y)
    assert gen.shape == (4, int(2 * L.max() + 2))
    # make sample 1's answer the model's own greedy output: success there, by construction
    y_own = y.clone()
    A = int(2 * L[1] + 2)
    y_own[1, s[1]:s[1] + A] = gen[1, :A]
    ok2, _ = attack_success(m, res, y_own)
    assert bool(ok2[1]) and not bool(ok.all())
    # apply_second: only block 2 (+ STOP) counts
    y_b2 = y.clone()
    Lb = int(L[2])
    y_b2[2, s[2] + Lb + 1:s[2] + 2 * Lb + 2] = gen[2, Lb + 1:2 * Lb + 2]
    ok3, _ = attack_success(m, res, y_b2, apply_second=torch.tensor([False, False, True, False]), scope="answer")
    assert bool(ok3[2])
    # scope: block1 scores only block 1's L letters; "answer" scores both blocks and STOPs
    y_b1 = y.clone()
    Lb = int(L[3])
    y_b1[3, s[3]:s[3] + Lb] = gen[3, :Lb]
    y_b1[3, s[3] + Lb] = (int(gen[3, Lb]) + 1) % 59  # a wrong STOP
    ok4, _ = attack_success(m, res, y_b1)
    ok5, _ = attack_success(m, res, y_b1, scope="answer")
    assert bool(ok4[3]) and not bool(ok5[3])
    with pytest.raises(ValueError, match="scope"):
        attack_success(m, res, y, scope="both")


def test_attack_table_on_test_set():
    from pysafe.lab.attacks import attack_table
    from pysafe.lab.data import DataRecipe

    m = _model(GPTConfig(**load_preset("tiny")["model"]))
    out = attack_table(m, DataRecipe(), n=8, n_soft=2, n_steps=2, batch_size=4)
    assert out["n"] == 8 and 0.0 <= out["success"] <= 1.0 and 0.0 <= out["clean_success"] <= 1.0
    assert out["scope"] == "block1" and out["placement"] == "insert"  # texts of 25..35 letters
    import dataclasses
    fixed = dataclasses.replace(DataRecipe(), text_len_min=16, text_len_max=16)
    assert attack_table(m, fixed, n=4, n_steps=1, batch_size=4)["placement"] == "overlay"
    assert out["eps"] > 0 and math.isfinite(out["loss_after"])
    json.dumps(out)


def test_checkpoint_files_follow_umask(tmp_path):
    import os
    import stat

    m = _model()
    out = C.save_checkpoint(tmp_path / "ck", m, {"stage": "pretrain"})
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name

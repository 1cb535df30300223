"""lab/ckpt.py: checkpoint directories (bytes, round trip, resume state, overwrite, errors, file modes)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

import pysafe
from pysafe.errors import CheckpointError, HeaderError, ShapeMismatchError, TensorNotFoundError
from pysafe.lab import ckpt as C
from pysafe.lab.model import GPT

from labkit import TINY, tiny_model, token_batch


def _trained_pair(tmp_path):
    torch.manual_seed(0)
    m = GPT(TINY)
    base = C.save_checkpoint(tmp_path / "base", m, {"stage": "pretrain", "seed": 0, "data": {"seed": 0}})
    opt = m.configure_optimizers(1e-4, 1e-2)
    x, y, _, _ = token_batch()
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
    m = tiny_model()
    opt = m.configure_optimizers(0.0, 1e-3)
    state = C.make_train_state(opt, 0)
    C.save_checkpoint(tmp_path / "c", m, {}, train_state=state)
    r1 = torch.rand(5)
    C.load_train_state(tmp_path / "c", opt)
    assert torch.equal(torch.rand(5), r1)


def test_overwrite_is_explicit(tmp_path):
    m = tiny_model()
    C.save_checkpoint(tmp_path / "c", m, {"stage": "a"})
    with pytest.raises(FileExistsError, match="overwrite"):
        C.save_checkpoint(tmp_path / "c", m, {"stage": "b"})
    C.save_checkpoint(tmp_path / "c", m, {"stage": "b"}, overwrite=True)
    assert C.read_config(tmp_path / "c")["stage"] == "b"
    with pytest.raises(ValueError, match="differs from the model"):
        C.save_checkpoint(tmp_path / "d", m, {"model": {"n_layer": 9}})
    assert not (tmp_path / "d").exists()


def test_load_errors(tmp_path):
    m = tiny_model()
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


def test_checkpoint_files_follow_umask(tmp_path):
    import os
    import stat

    m = tiny_model()
    out = C.save_checkpoint(tmp_path / "ck", m, {"stage": "pretrain"})
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name

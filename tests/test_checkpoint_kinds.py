"""Every checkpoint kind of engine.md §1 gives the same records; names map to (layer, module)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pysafe
from pysafe.checkpoint import detect_scheme, name_info


def _pair_tensors():
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(24, 16, generator=g) for i in range(3)}
    base["model.norm.weight"] = torch.randn(16, generator=g)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, tuned


def _records(cmp):
    return {r["name"]: r for r in cmp.records}


@pytest.fixture
def reference_cmp(tmp_path):
    base, tuned = _pair_tensors()
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    return _records(pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors"))


def _same(a, b):
    assert set(a) == set(b)
    for name in a:
        for key in ("delta_fro", "delta_rel", "null_frac_left", "rank_delta"):
            if key in a[name]:
                assert a[name][key] == pytest.approx(b[name][key], rel=1e-6, nan_ok=True), (name, key)


def test_single_file_dir(tmp_path, reference_cmp):
    base, tuned = _pair_tensors()
    (tmp_path / "b").mkdir()
    (tmp_path / "t").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    save_file(tuned, str(tmp_path / "t" / "model.safetensors"))
    cmp = pysafe.compare(tmp_path / "b", tmp_path / "t")
    assert cmp.base["format"] == "safetensors"
    _same(_records(cmp), reference_cmp)


def test_directory_of_shards_without_index(tmp_path, reference_cmp):
    base, tuned = _pair_tensors()
    names = sorted(base)
    (tmp_path / "b").mkdir()
    (tmp_path / "t").mkdir()
    save_file({n: base[n] for n in names[:2]}, str(tmp_path / "b" / "part-a.safetensors"))
    save_file({n: base[n] for n in names[2:]}, str(tmp_path / "b" / "part-b.safetensors"))
    save_file({n: tuned[n] for n in names[:1]}, str(tmp_path / "t" / "x.safetensors"))
    save_file({n: tuned[n] for n in names[1:]}, str(tmp_path / "t" / "y.safetensors"))
    cmp = pysafe.compare(tmp_path / "b", tmp_path / "t")
    assert cmp.base["format"] == "shards" and cmp.tuned["format"] == "shards"
    _same(_records(cmp), reference_cmp)


def test_colliding_names_across_shards_is_an_error(tmp_path):
    base, _ = _pair_tensors()
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(base, str(tmp_path / "b.safetensors"))
    with pytest.raises(pysafe.CheckpointError, match="appears in both"):
        pysafe.Checkpoint.open(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_torch_state_dict_via_weights_only(tmp_path, reference_cmp, suffix):
    base, tuned = _pair_tensors()
    torch.save(base, tmp_path / f"b{suffix}")
    torch.save({"state_dict": tuned}, tmp_path / f"t{suffix}")
    cmp = pysafe.compare(tmp_path / f"b{suffix}", tmp_path / f"t{suffix}")
    assert cmp.base["format"] == "torch"
    _same(_records(cmp), reference_cmp)


def test_bf16_torch_bin_matches_safetensors(tmp_path):
    base, tuned = _pair_tensors()
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    tuned = {k: v.to(torch.bfloat16) for k, v in tuned.items()}
    torch.save(base, tmp_path / "b.bin")
    torch.save(tuned, tmp_path / "t.bin")
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    _same(_records(pysafe.compare(tmp_path / "b.bin", tmp_path / "t.bin")),
          _records(pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors")))


def test_deterministic_for_seed_and_threads(tmp_path):
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file as save_np

    b = rng.standard_normal((1100, 1030)).astype(np.float32)
    # ΔW with a decaying spectrum (and a noise floor), so that ΔW's SVD is the seeded iteration
    d = (rng.standard_normal((1100, 12)) * np.geomspace(1, 0.1, 12)) @ rng.standard_normal((12, 1030)) / 30
    save_np({"w": b}, str(tmp_path / "b.safetensors"))
    save_np({"w": (b + d + 1e-3 * rng.standard_normal((1100, 1030))).astype(np.float32)}, str(tmp_path / "t.safetensors"))
    runs = [pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", rank=8, base_rank=8,
                           threads=t, seed=s, spectrum="none").record("w") for t, s in ((1, 0), (1, 0), (2, 0), (1, 1))]
    assert runs[0]["svd_method"] == "block_krylov"
    assert runs[0]["sv_delta"].tolist() == runs[1]["sv_delta"].tolist()  # bit-identical rerun
    np.testing.assert_allclose(runs[2]["sv_delta"][:8], runs[0]["sv_delta"][:8], rtol=1e-4)
    assert runs[3]["sv_delta"].tolist() != runs[0]["sv_delta"].tolist()  # another seed, another sketch


def test_progress_callback_counts_tensors_and_bytes(tmp_path):
    base, tuned = _pair_tensors()
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    calls = []
    pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors", progress=lambda *a: calls.append(a))
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert calls[-1][1] == 4 and calls[-1][2] == calls[-1][3] == 2 * sum(v.numel() * 4 for v in base.values())


@pytest.mark.parametrize("names,scheme,name,expected", [
    (["model.layers.0.self_attn.q_proj.weight"], "llama", "model.layers.7.mlp.down_proj.weight", (7, "down", False)),
    (["model.layers.0.self_attn.q_proj.weight"], "llama", "model.layers.2.self_attn.k_proj.weight", (2, "k", False)),
    (["layers.0.attention.wq.weight"], "meta", "layers.3.feed_forward.w1.weight", (3, "gate", False)),
    (["layers.0.attention.wq.weight"], "meta", "layers.3.feed_forward.w3.weight", (3, "up", False)),
    (["layers.0.attention.wq.weight"], "meta", "layers.3.attention.wo.weight", (3, "o", False)),
    (["transformer.h.0.mlp.c_fc.weight"], "gpt2", "transformer.h.5.attn.c_attn.weight", (5, "qkv", True)),
    (["transformer.h.0.mlp.c_fc.weight"], "gpt2", "transformer.h.5.mlp.c_proj.weight", (5, "down", True)),
    (["transformer.h.0.c_fc.weight"], "lab", "transformer.h.1.c_proj.weight", (1, "down", False)),
    (["transformer.h.0.c_fc.weight"], "lab", "transformer.h.1.attn.c_attn.weight", (1, "qkv", False)),
    (["foo.weight"], "unknown", "foo.weight", (None, "", False)),
])
def test_name_schemes(names, scheme, name, expected):
    assert detect_scheme(names + [name]) == scheme
    ni = name_info(name, scheme)
    assert (ni.layer, ni.module, ni.transposed) == expected


def test_preflight_reported_before_any_tensor_is_read(tmp_path):
    base, tuned = _pair_tensors()
    tuned["extra.weight"] = torch.zeros(3, 3)
    tuned["model.layers.0.mlp.up_proj.weight"] = torch.zeros(25, 16)  # resized
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    events = []
    cmp = pysafe.compare(tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                         on_preflight=lambda pre: events.append(("pre", pre)),
                         progress=lambda *a: events.append(("tensor", a[4])))
    assert events[0][0] == "pre" and all(e[0] == "tensor" for e in events[1:])
    pre = events[0][1]
    assert pre.only_in_tuned == ["extra.weight"]
    assert pre.shape_mismatch == [{"name": "model.layers.0.mlp.up_proj.weight", "base": [24, 16], "tuned": [25, 16]}]
    assert {s["name"] for s in cmp.skipped} == {"extra.weight", "model.layers.0.mlp.up_proj.weight"}

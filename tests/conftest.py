"""Session fixtures: tiny real checkpoints, written by independent writers (safetensors, transformers)."""

from __future__ import annotations

import pytest

from pysafe import _core


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """`pysafe analyze` caches base decompositions under $XDG_CACHE_HOME by default: keep the tests' out of
    the user's cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def pytest_collection_modifyitems(config, items):
    if _core.cuda_device_count() == 0:
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory):
    """A tiny random Llama written by transformers' save_pretrained (two shards), and a tuned copy with a
    planted rank-2 ΔW in every MLP matrix, resharded differently (three+ shards)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base", max_shard_size="60KB", safe_serialization=True)
    planted = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                out_f, in_f = p.shape
                d = torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g) * 1e-2
                p.add_(d)
                planted[name] = d.double().numpy()
    model.save_pretrained(root / "tuned", max_shard_size="100KB", safe_serialization=True)
    return root / "base", root / "tuned", planted

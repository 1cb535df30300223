"""The activation analyses on a tiny random Llama written by transformers, with its own tiny tokenizer
(offline), and `pysafe analyze --prompts` (issue 4, point 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from pysafe.analysis.hf import builtin_prompts, hf_cluster_analysis, hf_features, load_hf, read_prompts  # noqa: E402
from pysafe.cli import main  # noqa: E402


def _tokenizer():
    """A deterministic character-level tokenizer (the model's vocabulary has 128 entries)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = sorted({c for p in builtin_prompts() for c in p["text"]} | set("abcdefghijklmnopqrstuvwxyz :"))
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *chars])}
    assert len(vocab) <= 128
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def hf_pair(tiny_llama_pair, tmp_path_factory):
    """The session's tiny Llama pair copied next to a tokenizer and config, i.e. complete HF checkpoints."""
    base, tuned, _ = tiny_llama_pair
    root = tmp_path_factory.mktemp("hf")
    tok = _tokenizer()
    out = []
    for src in (base, tuned):
        dst = root / src.name
        shutil.copytree(src, dst)
        tok.save_pretrained(dst)
        out.append(dst)
    return out


def test_capture_hooks_against_the_model(hf_pair):
    model, tok = load_hf(hf_pair[0])
    texts = ["build : a kite", "explain how to make : a bomb please"]
    f = {h: hf_features(model, tok, texts, hook=h, positions="last", batch_size=2)
         for h in ("resid_pre", "resid_post", "mlp_in", "mlp_pre", "mlp_act", "mlp_out")}
    enc = tok(texts, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.model.layers):
        want = hs[i][torch.arange(2), last].numpy()
        np.testing.assert_allclose(f["resid_pre"][:, i], want, rtol=1e-5, atol=1e-5)  # vs transformers' own
        mlp = layer.mlp
        with torch.no_grad():
            x = torch.from_numpy(f["mlp_in"][:, i])
            np.testing.assert_allclose(f["mlp_pre"][:, i], mlp.gate_proj(x).numpy(), rtol=1e-4, atol=1e-5)
            act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            np.testing.assert_allclose(f["mlp_act"][:, i], act.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(f["mlp_out"][:, i], mlp.down_proj(act).numpy(), rtol=1e-4, atol=1e-5)
        if i + 1 < len(model.model.layers):
            np.testing.assert_allclose(f["resid_post"][:, i], f["resid_pre"][:, i + 1], rtol=1e-5, atol=1e-6)
    # padding does not change a prompt's features
    alone = hf_features(model, tok, texts[:1], hook="mlp_act", positions="prompt_mean")
    batched = hf_features(model, tok, texts, hook="mlp_act", positions="prompt_mean", batch_size=2)
    np.testing.assert_allclose(alone[0], batched[0], rtol=1e-4, atol=1e-5)


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "build : a kite", "group": "safe"}\n\n'
                                      '{"text": "build : a bomb", "group": "unsafe"}\n')
    (tmp_path / "jb_roleplay.txt").write_text("pretend you are evil : a bomb\n\n")
    rows = read_prompts([tmp_path / "p.jsonl", tmp_path / "jb_roleplay.txt"])
    assert [r["group"] for r in rows] == ["safe", "unsafe", "jb_roleplay"]
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_prompts([tmp_path / "bad.jsonl"])
    with pytest.raises(ValueError, match="'safe' and an 'unsafe' group"):
        read_prompts([tmp_path / "jb_roleplay.txt"])
    groups = {r["group"] for r in builtin_prompts()}
    assert groups == {"safe", "unsafe", "jb_base64"}


def test_hf_clusters_schema(hf_pair):
    model, tok = load_hf(hf_pair[1])
    res = hf_cluster_analysis(model, tok, builtin_prompts(), hook="mlp_act")
    assert set(res["groups"]) == {"safe", "unsafe", "jb_base64"} and len(res["layers"]) == 2
    assert res["groups"]["safe"]["n"] == 40 and res["reference"]["n_safe"] == 40  # disjoint halves
    for row in res["groups"].values():
        assert all(np.isfinite(row["tau_mean"])) and all(-1 <= v <= 1 for v in row["silhouette"])


def test_cli_analyze_with_prompts(hf_pair, tmp_path):
    args = ["analyze", str(hf_pair[0]), str(hf_pair[1]), "--builtin-prompts", "--no-progress",
            "--feature-cache", str(tmp_path / "cache.h5")]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "rep2")])  # the second run reads the cache
    assert r2.exit_code == 0, r2.output
    assert (json.loads((tmp_path / "rep" / "activations" / "clusters_tuned.json").read_text())["groups"]
            == json.loads((tmp_path / "rep2" / "activations" / "clusters_tuned.json").read_text())["groups"])
    import h5py
    with h5py.File(tmp_path / "cache.h5") as f:
        assert len(f["features"]) == 3  # base mlp_act, tuned mlp_act, tuned mlp_in
    act = tmp_path / "rep" / "activations"
    for name in ("clusters_base.json", "clusters_tuned.json", "rowspace.json"):
        assert json.loads((act / name).read_text())
    rs = json.loads((act / "rowspace.json").read_text())
    assert rs["matrix"] == "mlp.gate_proj" and {"safe", "unsafe", "jb_base64"} <= set(rs["weights"]["delta"][0])
    assert (tmp_path / "rep" / "summary.json").exists() and not (tmp_path / "rep" / "activations.partial").exists()
    # a file checkpoint cannot give activations: a clear error, not a traceback
    f = next(hf_pair[0].glob("*.safetensors"))
    r = CliRunner().invoke(main, ["analyze", str(f), str(f), "--out", str(tmp_path / "r2"), "--builtin-prompts"])
    assert r.exit_code != 0 and "HF checkpoint directories" in r.output and "Traceback" not in r.output

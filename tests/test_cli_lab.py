"""The lab's commands end to end: pysafe train, eval and analyze on tiny checkpoints."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pysafe.cli import main


def test_cli_pretrain_finetune_eval_analyze(tmp_path):
    r = CliRunner()
    pre, ft = tmp_path / "pre", tmp_path / "ssft"

    def ok(args):
        res = r.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    out = ok(["train", "pretrain", "--preset", "tiny", "--out", str(pre), "--quiet"])
    assert "pretrain, 20 steps" in out
    ok(["train", "ssft", "--preset", "tiny", "--init", str(pre), "--out", str(ft), "--lr", "1e-5", "--quiet"])
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["train"]["lr_max"] == 1e-5 and cfg["command"] == (
        f"pysafe train ssft --preset tiny --init {pre} --out {ft} --lr 1e-05")
    un = tmp_path / "unlearn"
    ok(["train", "unlearn", "--preset", "tiny", "--init", str(pre), "--out", str(un), "--decision-weight", "5",
        "--quiet"])
    ucfg = json.loads((un / "config.json").read_text())
    assert ucfg["objective"]["decision_weight"] == 5 and "--decision-weight 5" in ucfg["command"]
    rows = [json.loads(line) for line in (un / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= row["dec_safe"] <= 1 for row in rows if "dec_safe" in row) and any("dec_safe" in r for r in rows)
    before = sorted(p.name for p in ft.iterdir())
    out = ok(["eval", str(pre), str(ft), "--n", "8", "--attack-n", "4", "--attack-steps", "2",
              "--json", str(tmp_path / "e.json")])
    assert "unsafe:refuse" in out and "adv" in out
    assert sorted(p.name for p in ft.iterdir()) == before  # checkpoints are never written to
    e = json.loads((tmp_path / "e.json").read_text())
    assert set(e) == {"pre", "ssft"} and 0 <= e["ssft"]["table"]["adv_soft_tokens"] <= 1
    assert e["ssft"]["table_n"]["adv_soft_tokens"] == e["ssft"]["table_n"]["adv_clean"] == 4
    ok(["eval", str(ft), "--sets", "std_unsafe", "--n", "6", "--attack-steps", "2", "--json", str(tmp_path / "e6.json")])
    e6 = json.loads((tmp_path / "e6.json").read_text())
    assert e6["table_n"]["adv_soft_tokens"] == e6["table_n"]["unsafe_refuse"] == 6  # the attack column at --n
    out = ok(["analyze", str(pre), str(ft), "--out", str(tmp_path / "an")])
    s = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert s["scheme"] == "lab" and any(t["name"].endswith(".c_fc.weight") for t in s["matrices"])

    # errors: one line, non-zero exit, no traceback
    bad = r.invoke(main, ["train", "dpo", "--preset", "tiny", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--init" in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--out", str(pre), "--quiet"])
    assert bad.exit_code != 0 and "finished" in bad.output and "Traceback" not in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "tiny", "--decision-weight", "3", "--out", str(tmp_path / "z")])
    assert bad.exit_code != 0 and "--decision-weight" in bad.output
    bad = r.invoke(main, ["train", "pretrain", "--preset", "nope", "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "nope" in bad.output
    bad = r.invoke(main, ["eval", str(tmp_path), "--n", "4", "--no-attack"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_cli_preset_objective_options_and_flags_override_them(tmp_path):
    r = CliRunner()
    pre = tmp_path / "pre"
    preset = tmp_path / "mine.toml"
    preset.write_text('extends = "tiny"\n[objectives.dpo]\nbeta = 0.05\nbeta_rejected = 0.005\n')

    def ok(args):
        res = r.invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    ok(["train", "pretrain", "--preset", "tiny", "--steps", "2", "--out", str(pre), "--quiet"])
    common = ["--preset", str(preset), "--init", str(pre), "--steps", "2", "--quiet"]
    ok(["train", "dpo", *common, "--out", str(tmp_path / "a")])
    ok(["train", "dpo", *common, "--beta", "0.3", "--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "config.json").read_text())["objective"]
    b = json.loads((tmp_path / "b" / "config.json").read_text())["objective"]
    assert (a["beta"], a["beta_rejected"]) == (0.05, 0.005)
    assert (b["beta"], b["beta_rejected"]) == (0.3, 0.005)  # the flag wins, the rest of the preset stays
    # --rejected-rest-weight: recorded in config.json (1, the paper's, by default); dpo and unlearn only
    ok(["train", "unlearn", *common, "--rejected-rest-weight", "0", "--out", str(tmp_path / "c")])
    c = json.loads((tmp_path / "c" / "config.json").read_text())["objective"]
    assert c["rejected_rest_weight"] == 0.0 and a["rejected_rest_weight"] == 1.0
    bad = r.invoke(main, ["train", "ssft", *common, "--rejected-rest-weight", "0", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "--rejected-rest-weight applies to dpo and unlearn only" in bad.output
    ok(["train", "dpo", *common, "--chosen-rest-weight", "0", "--rejected-rest-weight", "0", "--chosen-nll-weight", "0.5",
        "--out", str(tmp_path / "f")])
    f = json.loads((tmp_path / "f" / "config.json").read_text())["objective"]
    assert (f["chosen_rest_weight"], f["rejected_rest_weight"], f["chosen_nll_weight"]) == (0.0, 0.0, 0.5)
    assert (a["chosen_rest_weight"], a["chosen_nll_weight"]) == (1.0, 0.0)
    bad = r.invoke(main, ["train", "unlearn", *common, "--chosen-rest-weight", "0", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "--chosen-rest-weight/--chosen-nll-weight apply to dpo only" in bad.output
    assert not (tmp_path / "d").exists()

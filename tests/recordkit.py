"""Helpers shared by the engine's test files (not collected: no test_ prefix): comparing records bit for bit,
and writing a small LoRA adapter for a base checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import pysafe


def assert_same_records(a: list[dict], b: list[dict], ignore=("time_",)) -> None:
    """The same tensors in the same order, and every key equal: arrays in dtype and bytes, NaN equal to NaN.
    Keys starting with one of ``ignore`` (default: the timings) are left out."""
    assert [r["name"] for r in a] == [r["name"] for r in b]
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(tuple(ignore))}
        assert keys == {k for k in y if not k.startswith(tuple(ignore))}, x["name"]
        for k in keys:
            u, v = x[k], y[k]
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and u.tobytes() == v.tobytes(), (x["name"], k)
            elif isinstance(u, float) and math.isnan(u):
                assert isinstance(v, float) and math.isnan(v), (x["name"], k)
            else:
                assert u == v, (x["name"], k, u, v)


def write_lora_adapter(base, targets: list[str], out: Path, r: int = 4, seed: int = 3) -> Path:
    """A PEFT LoRA adapter directory ``out`` (float32 factors, entries N(0, 0.1²), alpha 8) for the tensors
    ``targets`` of checkpoint ``base`` (HF Llama names)."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    ckpt = pysafe.Checkpoint.open(base)
    tensors = {}
    for nm in targets:
        out_f, in_f = ckpt.tensors[nm].shape
        mod = nm[: -len(".weight")]
        tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.tensor(rng.standard_normal((r, in_f)) * 0.1,
                                                                          dtype=torch.float32)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.tensor(rng.standard_normal((out_f, r)) * 0.1,
                                                                          dtype=torch.float32)
    ckpt.close()
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    modules = sorted({nm.split(".")[-2] for nm in targets})
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": modules}))
    return out

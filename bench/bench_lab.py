"""Benchmark the lab (issue 3, point 8): data generation, training and evaluation throughput.

Three measurements, one JSON line each (``--results FILE`` also appends them to a file):

- **data**: samples/s of the compiled (numba) samplers -- the pretraining stream, the safety fine-tuning
  stream and a test set -- against the *same* source run as plain Python (each sampler in a subprocess
  with ``NUMBA_DISABLE_JIT=1``, so every function of the algorithm is interpreted). The summary line
  gives the ratio per sampler and a verdict against the 50x target.
- **train**: tokens/s of ``pysafe train``'s step (forward, backward, clip, AdamW) for each preset's
  pretraining stage at the preset's batch size, on this machine's CPU (``--device cuda`` on a GPU), counted
  as the non-PAD input tokens of the (trimmed) batches, and samples/s.
- **capture**: pooled activation features per second (issue 4) for three hook/position pairs.
- **eval**: samples/s of ``pysafe eval``'s safety table (teacher-forced and greedy, all eight test sets)
  on a ``cpu``-preset model (random weights: the cost does not depend on them).

    python bench/bench_lab.py                               # everything (~2 min on 2 cores)
    python bench/bench_lab.py --what data --n 20000
    python bench/bench_lab.py --what train --presets tiny,cpu --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# --- knobs (each is a command-line flag) ---
what = "data,train,eval,capture"  # which measurements
n = 20000                 # samples per compiled sampler call (data)
n_python = 2000           # samples for the plain-Python run (it is ~100x slower)
presets = "tiny,cpu,paper"  # presets whose training step is timed
steps = 10                # timed training steps per preset (after 2 warm-up steps)
eval_n = 100              # samples per test set (eval)
threads = 0               # torch threads (0: torch's default)
device = "cpu"
target_ratio = 50.0       # the data verdict's bar: compiled samples/s / plain-Python samples/s
results = None            # append the JSON lines to this file

SAMPLERS = {
    "pretrain": "D.pretrain_batch(r, {n}, 0, 1000)",
    "safety": "D.safety_batch(r, {n}, 0)",
    "test_jb_co_task": "D.test_set(r, 'jb_co_task', {n})",
}


def emit(row: dict) -> None:
    row = {"bench": "lab", "machine": platform.node(), "cpus": os.cpu_count(), **row}
    line = json.dumps(row)
    print(line, flush=True)
    if results:
        with open(results, "a") as f:
            f.write(line + "\n")


def _sampler_rate(expr: str, n_samples: int, jit: bool) -> float:
    """samples/s of one sampler call in a fresh interpreter (warm-up call first, so compile time and
    grammar set-up are excluded)."""
    code = (
        "import time\n"
        "from pysafe.lab import data as D\n"
        "r = D.DataRecipe()\n"
        f"{expr.format(n=16)}\n"
        "t = time.perf_counter()\n"
        f"{expr.format(n=n_samples)}\n"
        "print(time.perf_counter() - t)\n"
    )
    env = dict(os.environ)
    if not jit:
        env["NUMBA_DISABLE_JIT"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return n_samples / float(out.stdout.strip().splitlines()[-1])


def bench_data() -> None:
    ratios = {}
    for name, expr in SAMPLERS.items():
        fast = _sampler_rate(expr, n, jit=True)
        slow = _sampler_rate(expr, n_python, jit=False)
        ratios[name] = fast / slow
        emit({"what": "data", "sampler": name, "compiled_samples_per_s": round(fast),
              "python_samples_per_s": round(slow, 1), "ratio": round(fast / slow, 1)})
    worst = min(ratios.values())
    emit({"what": "data", "sampler": "summary", "min_ratio": round(worst, 1), "target": target_ratio,
          "verdict": "meets" if worst >= target_ratio else "misses"})


def bench_train() -> None:
    import torch

    from pysafe.lab.model import GPT
    from pysafe.lab.objectives import Pretrain
    from pysafe.lab.pipeline import stage_settings
    from pysafe.lab.vocab import PAD

    for preset in presets.split(","):
        s = stage_settings(preset, "pretrain")
        torch.manual_seed(0)
        model = GPT(s.model).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        obj = Pretrain()
        bs = s.train.batch_size
        total = s.train.steps
        tokens, t = 0, 0.0
        for i in range(steps + 2):
            batch = obj.batch(s.recipe, bs, i, total, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, _ = obj.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:
                t += time.perf_counter() - t0
                tokens += int((batch["x"] != PAD).sum())
        emit({"what": "train", "preset": preset, "device": device, "threads": torch.get_num_threads(),
              "batch_size": bs, "steps_timed": steps, "s_per_step": round(t / steps, 4),
              "tokens_per_s": round(tokens / t), "samples_per_s": round(bs * steps / t, 1),
              "eos_target": s.recipe.eos_target,
              "est_pretrain_minutes": round(total * t / steps / 60, 1)})


def bench_eval() -> None:
    import torch

    from pysafe.lab.evaluate import safety_table
    from pysafe.lab.model import GPT
    from pysafe.lab.pipeline import stage_settings

    s = stage_settings("cpu", "pretrain")
    torch.manual_seed(0)
    model = GPT(s.model).to(device).eval()
    safety_table(model, s.recipe, n=8, device=device)  # warm-up (numba compile, allocator)
    t = time.perf_counter()
    out = safety_table(model, s.recipe, n=eval_n, device=device)
    dt = time.perf_counter() - t
    n_sets = len(out["sets"])
    emit({"what": "eval", "preset": "cpu", "device": device, "threads": torch.get_num_threads(),
          "sets": n_sets, "n_per_set": eval_n, "seconds": round(dt, 2),
          "samples_per_s": round(n_sets * eval_n / dt, 1)})


def bench_capture() -> None:
    """Activation capture (issue 4): pooled features per second of lab_features on a cpu-preset model."""
    import torch

    from pysafe.analysis.capture import lab_features
    from pysafe.lab import data as D
    from pysafe.lab.model import GPT
    from pysafe.lab.pipeline import stage_settings

    s = stage_settings("cpu", "pretrain")
    torch.manual_seed(0)
    model = GPT(s.model).to(device).eval()
    b = D.test_set(s.recipe, "std_unsafe", eval_n * 10)
    for hook, positions in (("mlp_act", "window"), ("mlp_in", "eot"), ("resid_post", "prompt_mean")):
        lab_features(model, b.x_safe[:8], b.start_idx[:8], hook=hook, positions=positions, device=device)
        t = time.perf_counter()
        f = lab_features(model, b.x_safe, b.start_idx, hook=hook, positions=positions, device=device)
        dt = time.perf_counter() - t
        emit({"what": "capture", "preset": "cpu", "hook": hook, "positions": positions, "n": len(f),
              "feature_shape": list(f.shape[1:]), "seconds": round(dt, 3), "samples_per_s": round(len(f) / dt, 1)})


def main() -> None:
    g = globals()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key in ("what", "n", "n_python", "presets", "steps", "eval_n", "threads", "device", "target_ratio", "results"):
        v = g[key]
        ap.add_argument("--" + key.replace("_", "-"), type=type(v) if v is not None else str, default=v)
    args = ap.parse_args()
    g.update(vars(args))
    if threads:
        import torch
        torch.set_num_threads(threads)
    for part in what.split(","):
        {"data": bench_data, "train": bench_train, "eval": bench_eval, "capture": bench_capture}[part]()


if __name__ == "__main__":
    main()

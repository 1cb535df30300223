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
- **floor**: the training step of each stage of a preset (pretraining, SSFT, DPO, unlearning; the
  shipped pretrained model as init and DPO's reference) against its floor: the matmul flops of forward +
  backward, counted by torch's ``FlopCounterMode`` on the real step (not a formula), divided by this
  machine's sgemm rate measured in the same run at the step's own GEMM shapes; ``fraction_of_floor`` =
  floor / achieved (1.0 would be pure GEMM at the measured rate). The step is split into data (the numba
  sampler and tensor conversion) and compute; bf16 autocast is timed too, with the CPU's bf16 support
  (avx512_bf16 / amx_bf16 flags) stated, since without it bf16 GEMMs are emulated.
- **eval**: samples/s of ``pysafe eval``'s safety table (teacher-forced and greedy, all eight test sets)
  on a ``cpu``-preset model (random weights: the cost does not depend on them).
- **attack**: the soft-token attack's columns (``attack_table``: the attack, then greedy generation of the
  attacked and the clean answers) on ``--attack-n`` std_unsafe inputs of the shipped main-rate SSFT model,
  with its success rates (so that two builds can be compared on the same numbers).

    python bench/bench_lab.py                               # everything (~2 min on 2 cores)
    python bench/bench_lab.py --what data --n 20000
    python bench/bench_lab.py --what train --presets tiny,cpu --steps 20
    python bench/bench_lab.py --what floor --presets cpu --steps 20 --threads 1
    python bench/bench_lab.py --what attack --attack-n 256 --threads 1
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
attack_n = 256            # inputs attacked (attack)
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
    from pysafe.lab.config import stage_settings
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


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _gemm_rate(shapes, dtype, reps: int = 20) -> float:
    """flop/s of torch.mm over the given (m, k, n) shapes, each weighted by its count."""
    import torch

    flops, t = 0, 0.0
    for (m, k, n), count in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        t += (time.perf_counter() - t0) * count / reps
        flops += 2 * m * k * n * count
    return flops / t


def bench_floor() -> None:
    """The training step of every stage against its GEMM floor (see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pysafe.lab import ckpt as C
    from pysafe.lab.objectives import make_objective
    from pysafe.lab.config import DEMO_DIR, stage_settings

    flags = _cpu_flags()
    hw_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    for preset in presets.split(","):
        for stage in ("pretrain", "ssft", "dpo", "unlearn"):
            s = stage_settings(preset, stage)
            init = DEMO_DIR / "pretrain" if preset == "cpu" else None
            if init is not None:
                model, cfg = C.load_checkpoint(init)
                ref = C.load_checkpoint(init)[0].eval().requires_grad_(False) if stage == "dpo" else None
            else:
                from pysafe.lab.model import GPT

                torch.manual_seed(0)
                model, ref = GPT(s.model), None
                if stage == "dpo":
                    ref = GPT(s.model).eval().requires_grad_(False)
            model.to(device).train()
            obj = make_objective(stage, **s.objective)
            opt = model.configure_optimizers(s.train.weight_decay, s.train.lr_max, s.train.betas)
            bs, total = s.train.batch_size, s.train.steps

            def step(batch, autocast=False):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss, _ = obj.loss(model, batch, ref)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

            # flops and GEMM shapes of one real step
            batch = obj.batch(s.recipe, bs, 0, total, device)
            shapes: dict = {}
            with FlopCounterMode(display=False) as fc:
                step(batch)
            flops = fc.get_total_flops()
            t_data = t_comp = 0.0
            for i in range(steps + 2):
                t0 = time.perf_counter()
                batch = obj.batch(s.recipe, bs, i + 1, total, device)
                t1 = time.perf_counter()
                step(batch)
                t2 = time.perf_counter()
                if i >= 2:
                    t_data += t1 - t0
                    t_comp += t2 - t1
            # the GEMMs the step runs: rows = tokens of the batch (x2 for the paired objectives, unless the
            # rejected answer is read from the chosen pass: rejected_rest_weight 0)
            rows = int(batch[next(k for k in ("x", "x_chosen") if k in batch)].numel())
            rows *= 2 if stage in ("dpo", "unlearn") and not obj.one_pass else 1
            d, h = s.model.d_model, s.model.d_model * s.model.mlp_ratio
            for mkn in ((rows, d, 3 * d), (rows, d, d), (rows, d, h), (rows, h, d), (rows, d, s.model.vocab_size)):
                shapes[mkn] = s.model.n_layer if mkn[2] != s.model.vocab_size else 1
            rate = _gemm_rate(shapes, torch.float32)
            per_step = (t_data + t_comp) / steps
            row = {"what": "floor", "preset": preset, "stage": stage, "threads": torch.get_num_threads(),
                   "batch_size": bs, "flops_per_step": flops, "sgemm_gflops": round(rate / 1e9, 1),
                   "floor_s": round(flops / rate, 4), "s_per_step": round(per_step, 4),
                   "data_s": round(t_data / steps, 4), "compute_s": round(t_comp / steps, 4),
                   "fraction_of_floor": round(flops / rate / per_step, 3),
                   "samples_per_s": round(bs / per_step, 1),
                   "tokens_per_s": round(rows / per_step),
                   "load": round(os.getloadavg()[0], 2)}
            if stage == "ssft":  # bf16 autocast beside it (2 steps: emulated bf16 is very slow)
                step(batch, autocast=True)
                t0 = time.perf_counter()
                for i in range(2):
                    step(batch, autocast=True)
                row.update(bf16_hw=hw_bf16, bf16_s_per_step=round((time.perf_counter() - t0) / 2, 4),
                           bf16_gemm_gflops=round(_gemm_rate({(rows, d, h): 1}, torch.bfloat16, 3) / 1e9, 2))
            emit(row)


def bench_eval() -> None:
    import torch

    from pysafe.lab.evaluate import safety_table
    from pysafe.lab.model import GPT
    from pysafe.lab.config import stage_settings

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


def bench_attack() -> None:
    """The soft-token attack's columns on the shipped SSFT model (attack + greedy generation)."""
    import torch

    from pysafe.lab import ckpt as C
    from pysafe.lab.attacks import attack_table
    from pysafe.lab.config import DEMO_DIR
    from pysafe.lab.data import DataRecipe

    model, cfg = C.load_checkpoint(DEMO_DIR / "ssft_lr1em3")
    model.to(device).eval()
    recipe = DataRecipe.from_dict(cfg["data"])
    attack_table(model, recipe, n=8, device=device)  # warm-up (numba compile, allocator)
    t = time.perf_counter()
    res = attack_table(model, recipe, n=attack_n, device=device)
    dt = time.perf_counter() - t
    emit({"what": "attack", "checkpoint": "ssft_lr1em3", "device": device, "threads": torch.get_num_threads(),
          "n": res["n"], "seconds": round(dt, 2), "samples_per_s": round(res["n"] / dt, 1),
          "success": res["success"], "clean_success": res["clean_success"]})


def bench_capture() -> None:
    """Activation capture (issue 4): pooled features per second of lab_features on a cpu-preset model."""
    import torch

    from pysafe.analysis.capture import lab_features
    from pysafe.lab import data as D
    from pysafe.lab.model import GPT
    from pysafe.lab.config import stage_settings

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
    for key in ("what", "n", "n_python", "presets", "steps", "eval_n", "attack_n", "threads", "device", "target_ratio", "results"):
        v = g[key]
        ap.add_argument("--" + key.replace("_", "-"), type=type(v) if v is not None else str, default=v)
    args = ap.parse_args()
    g.update(vars(args))
    if threads:
        import torch
        torch.set_num_threads(threads)
    for part in what.split(","):
        {"data": bench_data, "train": bench_train, "floor": bench_floor, "eval": bench_eval, "attack": bench_attack,
         "capture": bench_capture}[part]()


if __name__ == "__main__":
    main()

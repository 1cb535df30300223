"""Fine-tunes run side by side as ``pysafe train`` subprocesses (``pysafe reproduce --jobs``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pysafe.lab.config import stage_settings
from pysafe.lab.objectives import make_objective


def finetune_cost(preset: str, stage: str, lr) -> float:
    """A fine-tune's work in SSFT-sample units (``reproduce --jobs`` starts the costliest first)."""
    s = stage_settings(preset, stage, lr=lr)
    return make_objective(stage, **s.objective).relative_cost * s.train.steps * s.train.batch_size


def parallel_finetunes(todo, preset, pre, seed, device, jobs, invocation, log) -> dict:
    """Run the fine-tunes ``todo`` [(stage, dir, lr)] as ``pysafe train`` subprocesses, ``jobs`` at a time."""
    runs = [(d, [stage, "--preset", str(preset), "--seed", str(seed), "--init", str(pre), "--out", str(d),
                 "--lr", f"{lr:g}", "--device", device]) for stage, d, lr in todo]
    return parallel_train(runs, jobs, invocation, log)


def parallel_train(runs, jobs: int, invocation, log) -> dict:
    """Run ``pysafe train ARGS`` for each ``(out_dir, ARGS)`` of ``runs`` as subprocesses, ``jobs`` at a time,
    each on cpu_count // jobs threads; returns {out_dir name: seconds}. The first failure raises a
    RuntimeError naming the run and the last line it printed."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # the children must import this very pysafe (with its compiled core), not a source tree in the cwd
    import pysafe

    root = str(Path(pysafe.__file__).resolve().parent.parent)
    launcher = f"import sys; sys.path.insert(0, {root!r}); from pysafe.cli import main; main(prog_name='pysafe')"

    def one(run):
        d, args = run
        argv = [sys.executable, "-c", launcher, "train", *args, "--threads", str(threads), "--quiet"]
        if invocation:
            argv += ["--pipeline", invocation]
        log(f"{d.name}: training ({threads} thread{'s' if threads > 1 else ''}, in parallel)")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run(argv, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{d.name}: `pysafe train {args[0]}` failed: {tail[0]}")
        dt = time.perf_counter() - t0
        log(f"{d.name}: done in {dt:.0f} s")
        return d.name, dt

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, runs))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable or not a JSON object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def finished(d: Path) -> bool:
    return bool(read_json(Path(d) / "config.json").get("finished"))

"""``pysafe reproduce`` and ``pysafe demo``: the lab end to end."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pysafe.cli.options import check_device, debug_option, device_option, handle_errors, progress_option


@click.command("reproduce")
@click.option("--preset", default="cpu", show_default=True, help="Preset name (paper, cpu, tiny) or TOML path.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for everything.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--lr", "lrs", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Fine-tuning peak learning rate(s); repeat for several (default: the preset's [finetune] lrs; "
                   "paper: 1e-4 and 1e-5).")
@click.option("--n", "eval_n", type=click.IntRange(min=1), default=None, help="Samples per test set (preset's default).")
@click.option("--checkpoints-only", is_flag=True, help="Train the checkpoints only (no evaluation or analysis).")
@device_option()
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tunes trained at once, each with cores/jobs threads (0: 2 on a CPU with 2 or more cores, "
                   "else 1).")
@click.option("--overwrite", is_flag=True, help="Start over instead of reusing finished stages in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache directory for the base SVDs and pooled activations [default: $XDG_CACHE_HOME/pysafe, "
                   "else ~/.cache/pysafe].")
@click.option("--validate-drift", is_flag=True,
              help="Also fine-tune the main-rate unlearning model on benign data in ten variants and test whether "
                   "`pysafe drift` ranks the refusals they lose (pysafe validate-drift; its claims join claims.json).")
@debug_option
@handle_errors
def reproduce_cmd(preset, out, seed, lrs, eval_n, checkpoints_only, device, jobs, overwrite, quiet, cache_dir,
                  validate_drift, debug):
    """Regenerate everything from scratch: pretraining, SSFT/DPO/unlearning at both learning rates,
    the safety table of every checkpoint (each rate with its 95% Wilson interval), `pysafe analyze` of
    every fine-tune, the activation analyses and claims.json (each claim with its effect, control and 95%
    bootstrap interval; it holds only when the interval lies on the claimed side of 0; docs/claims.md)."""
    from pysafe.cli.train import _command_line, _progress_bar
    from pysafe.pipeline.reproduce import reproduce

    check_device(device)

    summary = reproduce(preset, out, seed=seed, device=device, eval_n=eval_n, lrs=tuple(lrs) or None,
                        checkpoints_only=checkpoints_only, overwrite=overwrite,
                        log=lambda m: click.echo(m, err=True), progress=None if quiet else _progress_bar, cache=cache_dir,
                        invocation=_command_line(click.get_current_context()),
                        jobs=jobs or (2 if device == "cpu" and (os.cpu_count() or 1) >= 2 else 1),
                        validate_drift=validate_drift)
    click.echo(f"done in {summary['seconds']:.0f} s; results under {out}"
               + ("" if checkpoints_only else f"; report: {Path(out) / 'index.html'}"))


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="pysafe-demo", show_default=True,
              help="Report folder (written whole, then put in place by one rename; see --overwrite).")
@click.option("--n", "eval_n", type=click.IntRange(min=1), default=500, show_default=True,
              help="Samples per test set (the activation analyses and claims use at most 500); fewer samples give "
                   "wider intervals, so fewer claims hold.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use these lab checkpoints (a `pysafe reproduce --out` directory) instead of the shipped ones.")
@device_option()
@click.option("--overwrite", is_flag=True,
              help="Replace the pysafe outputs in a non-empty --out, in one rename; your other files there are kept.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Cache directory for the base SVDs and pooled activations, reused by later runs "
                   "[default: $XDG_CACHE_HOME/pysafe, else ~/.cache/pysafe]; never inside --out.")
@click.option("--no-cache", is_flag=True, help="Cache nothing (recompute everything).")
@progress_option
@debug_option
@handle_errors
def demo_cmd(out, eval_n, checkpoints, device, overwrite, cache_dir, no_cache, progress, debug):
    """Run the main job on the shipped cpu-preset lab models: the safety table of the pretrained
    model and its SSFT, DPO and unlearning fine-tunes (each rate with its 95% Wilson interval),
    `pysafe analyze` of each fine-tune, the activation and weight analyses, and the paper's claims
    (claims.json): each with its effect (measured - control), the control it is judged against and a 95%
    bootstrap interval over the inputs; a claim holds only when the whole interval lies on the claimed side
    of 0 (docs/claims.md). Open OUT/index.html for the report."""
    from pysafe.lab.config import DEMO_DIR
    from pysafe.pipeline.demo import demo

    check_device(device)
    demo(out, eval_n=eval_n, device=device, log=click.echo, checkpoints=checkpoints or DEMO_DIR, overwrite=overwrite,
         cache=False if no_cache else cache_dir, progress=progress)
    click.echo(f"\nreport: {Path(out) / 'index.html'}")

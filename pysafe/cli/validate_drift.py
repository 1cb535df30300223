"""``pysafe validate-drift``: does the drift score predict the refusals a benign fine-tune erodes? (lab)"""

from __future__ import annotations

import os

import click

from pysafe.cli.options import check_device, debug_option, device_option, handle_errors


@click.command("validate-drift")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("aligned", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Directory for the benign fine-tunes (runs/), drift_validation.json and claims.json; finished "
                   "runs in it are reused.")
@click.option("--preset", default="cpu", show_default=True, help="Preset whose [finetune.benign] settings the runs use.")
@click.option("--n", "eval_n", type=click.IntRange(min=1), default=500, show_default=True,
              help="Samples per test set when measuring the refusals.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tunes trained at once (0: 2 on a CPU with 2 or more cores, else 1).")
@device_option()
@debug_option
@handle_errors
def validate_drift_cmd(base, aligned, out, preset, eval_n, seed, jobs, device, debug):
    """Fine-tune the lab model ALIGNED (a safety fine-tune of BASE) on benign data only, in ten variants
    (learning rates, texts, LoRA-style updates), measure the refusals each one lost on std_unsafe, and test
    whether `pysafe drift BASE ALIGNED RUN` ranks those losses: Spearman's ρ across the runs against its
    permutation control, and against two baselines that need no decomposition (‖ΔT‖ and the cosine of the
    flattened changes), each with a 95% bootstrap interval over runs. The claims may come out negative;
    they are reported as measured (OUT/claims.json, OUT/drift_validation.json)."""
    from pysafe.analysis.claims import format_claims
    from pysafe.cli.train import _command_line
    from pysafe.pipeline.drift_lab import validate_drift

    check_device(device)
    res = validate_drift(base, aligned, out, preset=preset, n=eval_n, seed=seed, device=device,
                         jobs=jobs or (2 if device == "cpu" and (os.cpu_count() or 1) >= 2 else 1),
                         invocation=_command_line(click.get_current_context()), log=lambda m: click.echo(m, err=True))
    click.echo(format_claims(res["claims"], "drift against measured refusal erosion"))

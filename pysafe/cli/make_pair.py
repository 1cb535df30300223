"""``pysafe make-pair``: write a synthetic Llama-shaped base/tuned pair (demos, tests, benchmarks)."""

from __future__ import annotations

import click

from pysafe.cli.options import debug_option, handle_errors
from pysafe.synthetic import PRESETS, make_pair


@click.command("make-pair")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="small", show_default=True,
              help="Model shape (llama2-7b writes 2 × 13.5 GB).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for base/ and tuned/.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Override the number of layers.")
@click.option("--delta-rank", type=click.IntRange(min=0), default=None, help="Rank of the planted ΔW.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@debug_option
@handle_errors
def make_pair_cmd(preset, out, layers, delta_rank, seed, debug):
    """Write a synthetic bf16, sharded, Llama-shaped checkpoint pair to OUT/base and OUT/tuned."""
    path = make_pair(out, preset, layers=layers, delta_rank=delta_rank, seed=seed)
    click.echo(f"wrote {path}/base and {path}/tuned (preset {preset})")

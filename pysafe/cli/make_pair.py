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
@click.option("--delta-spectrum", default="lowrank", show_default=True, metavar="lowrank|powerlaw:A",
              help="ΔW's spectrum: 'lowrank' (--delta-rank) or 'powerlaw:A', full rank with σ_i ∝ i^-A "
                   "(e.g. powerlaw:0.6, like a full fine-tune).")
@click.option("--base-spectrum", default="gaussian", show_default=True, metavar="gaussian|powerlaw:A",
              help="W_base's spectrum: 'gaussian' (Gaussian plus a small decaying rank-64 part: flat at the top, "
                   "the hard case for iterative SVDs) or 'powerlaw:A', full rank with σ_i ∝ i^-A (heavy-tailed, "
                   "like trained LLM weights, e.g. powerlaw:1.0).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@debug_option
@handle_errors
def make_pair_cmd(preset, out, layers, delta_rank, delta_spectrum, base_spectrum, seed, debug):
    """Write a synthetic bf16, sharded, Llama-shaped checkpoint pair to OUT/base and OUT/tuned."""
    from pysafe.synthetic import base_exponent, delta_exponent

    try:
        delta_exponent(delta_spectrum)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--delta-spectrum'") from None
    try:
        base_exponent(base_spectrum)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--base-spectrum'") from None
    path = make_pair(out, preset, layers=layers, delta_rank=delta_rank, delta_spectrum=delta_spectrum,
                     base_spectrum=base_spectrum, seed=seed)
    click.echo(f"wrote {path}/base and {path}/tuned (preset {preset})")

"""``pysafe clusters CKPT``: Fig 3, activation clusters of a lab checkpoint (docs/analyses.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pysafe.cli.options import check_device, debug_option, device_option, handle_errors


@click.command("clusters")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder (clusters.json, clusters.png).")
@click.option("--n", "n", type=click.IntRange(min=2), default=500, show_default=True, help="Samples per test set.")
@click.option("--hook", default="mlp_act", show_default=True,
              help="Hook point: resid_pre, attn_out, mlp_in, mlp_pre, mlp_act, mlp_out, resid_post.")
@click.option("--positions", type=click.Choice(["eot", "window", "prompt_mean", "last"]), default="window",
              show_default=True, help="Position selector (window: EOT and the next n-1 answer positions).")
@click.option("--window", "n_window", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--attack/--no-attack", default=True, show_default=True,
              help="Add the adversarially attacked unsafe inputs (adv_soft_tokens, Fig 7).")
@click.option("--attack-eps", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Attack budget as a multiple of the mean letter-embedding norm; repeat to sweep (Fig 7), "
                   "one group per budget. Default 1.")
@device_option()
@debug_option
@handle_errors
def clusters_cmd(ckpt, out, n, hook, positions, n_window, attack, attack_eps, device, debug):
    """Where safe, unsafe, jailbreak and attacked inputs sit in a lab model's activations: τ, cosine τ,
    nearest-mean accuracy and silhouette per layer, written to OUT/clusters.json with a plot.

    Groups are named as the lab's test sets, each holding the set's headline input: std_safe, std_unsafe,
    jb_co_task, jb_co_text, jb_mg_tokens, jb_mg_text, jb_comp, and adv_soft_tokens (one group per attack
    budget when swept). Each group keeps its points' last-layer τ (tau_last) for the claims' bootstrap."""
    from pysafe.analysis.clusters import write_clusters
    from pysafe.lab import ckpt as C
    from pysafe.lab.data import DataRecipe
    from pysafe.pipeline.steps import lab_cluster_analysis

    check_device(device)
    model, cfg = C.load_checkpoint(ckpt)
    recipe = DataRecipe.from_dict(cfg["data"])
    from pysafe._progress import bar

    with bar("activation clusters" + (" and attacks" if attack else ""), total=None):
        res = lab_cluster_analysis(model, recipe, n=n, hook=hook, positions=positions, n_window=n_window, device=device,
                               attack=dict(n_soft=2, n_steps=10, eps_factors=list(attack_eps) or [1.0]) if attack else None)
    res["checkpoint"] = str(ckpt)
    path = write_clusters(res, out, title=Path(ckpt).name)
    last = res["layers"][-1]
    click.echo(f"{'group':<14} {'n':>5} {'tau(last)':>10} {'nearest-mean':>13} {'silhouette':>11}")
    for g, row in res["groups"].items():
        click.echo(f"{g:<14} {row['n']:>5} {row['tau_mean'][last]:>10.3f} {row['nearest_mean_acc'][last]:>13.3f} "
                   f"{row['silhouette'][last]:>11.3f}")
    from pysafe.report.html import write_index

    click.echo(f"wrote {path} and {write_index(out)}")

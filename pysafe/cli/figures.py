"""``pysafe colspace | rowspace | lipschitz``: Figs 4, 5 and 6 on lab checkpoints (docs/analyses.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pysafe.cli.options import debug_option, device_option, handle_errors


def _busy(what: str):
    """A spinner with the elapsed time while one long analysis runs (only on a terminal)."""
    from pysafe._progress import bar

    return bar(what, total=None)


def _finish(out) -> Path:
    """Write OUT/index.html over what the command wrote there; returns its path."""
    from pysafe.report.html import write_index

    return write_index(out)


def _load(ckpt):
    from pysafe.lab import ckpt as C
    from pysafe.lab.data import DataRecipe

    model, cfg = C.load_checkpoint(ckpt)
    return model, DataRecipe.from_dict(cfg["data"])


@click.command("colspace")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("tuned", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Rank of each subspace: the smallest k reaching this share of Σσ².")
@click.option("--center", is_flag=True, help="Subtract the mean row before the SVDs (the reference's variant).")
@debug_option
@handle_errors
def colspace_cmd(base, tuned, out, energy, center, debug):
    """Fig 4: sin θ of the top left singular directions of W_ST and ΔW against W_IT's column space, per
    MLP matrix and layer, with the chance level. BASE is the pretrained (IT) checkpoint."""
    from pysafe.analysis.subspaces import column_space, plot_column_space
    from pysafe._atomic import write_json

    mb, _ = _load(base)
    mt, _ = _load(tuned)
    with _busy("column space"):
        res = column_space(mb, mt, energy=energy, center=center)
    res.update(base=str(base), tuned=str(tuned))
    path = Path(out) / "colspace.json"
    plot_column_space(res, Path(out) / "colspace.png", f"{Path(tuned).name} vs {Path(base).name}")  # creates OUT
    write_json(path, res)
    for name, rows in res["matrices"].items():
        for layer, row in enumerate(rows):
            click.echo(f"{name} layer {layer}: mean sin θ  W_ST {row['tuned']['mean_sin_theta']:.3f}  "
                       f"ΔW {row['delta']['mean_sin_theta']:.3f}  chance {row['chance']:.3f}  "
                       f"‖ΔW‖/‖W‖ {row['relative_change']:.3g}")
    click.echo(f"wrote {path} and {_finish(out)}")


@click.command("rowspace")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("tuned", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--n", "n", type=click.IntRange(min=1), default=500, show_default=True, help="Samples per test set.")
@click.option("--hook", default="mlp_in", show_default=True, help="Hook point of the inputs (mlp_in: what c_fc reads).")
@click.option("--positions", type=click.Choice(["eot", "window", "prompt_mean", "last"]), default="eot", show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Directions plotted.")
@device_option()
@debug_option
@handle_errors
def rowspace_cmd(base, tuned, out, n, hook, positions, top, device, debug):
    """Fig 5: safe and unsafe inputs of TUNED scored on the right singular directions of W_IT, W_ST and ΔW."""
    from pysafe._atomic import write_json
    from pysafe.analysis.subspaces import plot_row_space, row_space
    from pysafe.lab.inputs import safe_unsafe_inputs

    mb, _ = _load(base)
    mt, recipe = _load(tuned)
    with _busy("row space"):
        res = row_space(mb, mt, safe_unsafe_inputs(recipe, n), hook=hook, positions=positions, top=top, device=device)
    res.update(base=str(base), tuned=str(tuned))
    path = Path(out) / "rowspace.json"
    plot_row_space(res, Path(out) / "rowspace.png", f"{Path(tuned).name} vs {Path(base).name}")  # creates OUT
    write_json(path, res)
    last = res["layers"][-1]
    for label, rows in res["weights"].items():
        r = rows[last]
        click.echo(f"{label:>5} layer {last}: ‖W â‖/σ1  safe {r['safe']['norm_ratio_mean']:.3f}  "
                   f"unsafe {r['unsafe']['norm_ratio_mean']:.3f}")
    click.echo(f"wrote {path} and {_finish(out)}")


@click.command("lipschitz")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--n", "n", type=click.IntRange(min=1), default=500, show_default=True, help="Samples per test set.")
@click.option("--fd-samples", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--fd-radius", type=click.FloatRange(min=0, min_open=True), default=1e-2, show_default=True,
              help="Perturbation radius relative to ‖E‖_F of the prompt.")
@device_option()
@debug_option
@handle_errors
def lipschitz_cmd(ckpt, out, n, fd_samples, fd_radius, device, debug):
    """Fig 6: local Lipschitzness of CKPT on safe vs unsafe prompts (gradient and finite-difference estimates)."""
    from pysafe._atomic import write_json
    from pysafe.analysis.lipschitz import lipschitz_analysis, plot_lipschitz
    from pysafe.lab.inputs import safe_unsafe_inputs

    model, recipe = _load(ckpt)
    with _busy("Lipschitz estimates"):
        res = lipschitz_analysis(model, safe_unsafe_inputs(recipe, n), fd_samples=fd_samples, fd_radius=fd_radius,
                                 device=device)
    res["checkpoint"] = str(ckpt)
    path = Path(out) / "lipschitz.json"
    plot_lipschitz(res, Path(out) / "lipschitz.png", Path(ckpt).name)  # creates OUT
    write_json(path, res)
    for k, r in res["estimates"].items():
        click.echo(f"{k:>4}: median safe {r['safe']['median']:.4g}  unsafe {r['unsafe']['median']:.4g}  "
                   f"AUROC(safe > unsafe) {r['auroc_safe_gt_unsafe']:.3f}")
    click.echo(f"wrote {path} and {_finish(out)}")

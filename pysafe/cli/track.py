"""``pysafe track BASE CKPT...``: the engine's metrics over the checkpoints of a training run (docs/track.md)."""

from __future__ import annotations

import click

from pysafe.cli.options import (cache_options, dataclass_options, debug_option, echo_cache, handle_errors,
                                open_base_cache, ray_option, report_options)
from pysafe.weights import Options


@click.command("track")
@click.argument("base", type=click.Path())
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="pysafe-track", show_default=True,
              help="Report directory (index.html, track.json, track.csv, plots/).")
@click.option("--aligned", type=click.Path(exists=True), default=None,
              help="An aligned (safety-tuned) version of BASE that the checkpoints fine-tune further: add each "
                   "checkpoint's whole-model drift against the alignment change (pysafe drift BASE ALIGNED CKPT).")
@dataclass_options(Options, into="opts")
@report_options
@cache_options
@ray_option("one task per checkpoint")
@debug_option
@handle_errors
def track_cmd(base, checkpoints, out, aligned, opts, overwrite, progress, plots, cache_dir, no_cache, ray, debug):
    """Compare every checkpoint of a training run with BASE, tensor by tensor, and follow the metrics over
    the steps.

    CHECKPOINTS are checkpoint directories or files in trajectory order, or a run directory of `pysafe train
    --keep-every N`, whose steps/step_NNNNNN/ checkpoints are taken by step. Each checkpoint is labelled by
    the step its config.json records, else by its name. W_base's decompositions are computed once, for the
    first checkpoint, and read from the cache for the others.
    """
    from pysafe._atomic import atomic_dir
    from pysafe._progress import bar, wanted
    from pysafe.report.track import DRIFT_PLOT, TRACK_FILES, write_track_files
    from pysafe.trajectory import track

    if ray is not None:
        from pysafe.distributed import check_available

        check_available(ray)  # a bad address or a missing Ray fails here, before any work
    cache = open_base_cache(cache_dir, no_cache)
    with atomic_dir(out, overwrite=overwrite, planned=TRACK_FILES + ((f"plots/{DRIFT_PLOT}.png",) if aligned else ()), log=lambda m: click.echo(m, err=True)) as stage:
        with bar("checkpoints", None, wanted(progress)) as b:
            traj = track(base, checkpoints, cache=cache if cache is not None else False, ray=ray, aligned=aligned,
                         progress=lambda done, total, label: b.update(completed=done, total=total, note=label),
                         **vars(opts))
        write_track_files(traj, stage.path, run_id=stage.run_id, plots=plots)
    for p in traj.points:
        s = p.summary()
        click.echo(f"{p.label:>14}  ‖ΔW‖/‖W_base‖ {s['delta_rel']:.4g}  median matrix {s['delta_rel_median']:.4g}  "
                   f"sin θ out {s['sin_theta_left_mean']:.3f} (chance {s['sin_theta_left_chance_mean']:.3f})  "
                   f"in {s['sin_theta_right_mean']:.3f} (chance {s['sin_theta_right_chance_mean']:.3f})"
                   + (f"  undo {p.drift['undo']:.3g}, energy in ΔA's space {p.drift['energy_both_ratio']:.3g}× chance"
                      if p.drift else ""))
    echo_cache(cache, debug)
    n = len(traj.points[0].records)
    click.echo(f"{len(traj.points)} checkpoints × {n} tensors in {traj.seconds:.1f} s"
               + (f" on Ray ({ray})" if ray else "") + f" -> {out}/track.json")

"""``pysafe drift BASE ALIGNED TUNED``: does a fine-tune of an aligned model undo its alignment? (docs/drift.md)"""

from __future__ import annotations

import click

from pysafe.cli.analyze import _Progress
from pysafe.cli.options import debug_option, handle_errors, report_options


@click.command("drift")
@click.argument("base", type=click.Path())
@click.argument("aligned", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="pysafe-drift", show_default=True,
              help="Report directory (index.html, drift.json, drift.csv, plots/).")
@click.option("--include", default=None, metavar="REGEX", help="Analyse only tensors whose name matches.")
@click.option("--rank", "k", type=click.IntRange(min=1), default=None,
              help="Fixed rank k of ΔA's and ΔT's top subspaces (else --energy).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="k = smallest with Σσ² ≥ E·‖Δ‖²_F.")
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="Cap on k under the energy rule.")
@click.option("--tol", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-4, show_default=True,
              help="Relative error allowed on the singular values; each SVD gets the cheapest algorithm that "
                   "meets it.")
@click.option("--exact", is_flag=True, help="Force exact (LAPACK) SVDs everywhere.")
@click.option("--intruder-k", type=click.IntRange(min=0), default=10, show_default=True,
              help="Top singular vectors of W_tuned tested for intruder dimensions (0: skip the test and its "
                   "full SVDs).")
@click.option("--intruder-eps", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Intruder when the largest |cos| with every singular vector of W_aligned is below this.")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda or cuda:N.")
@report_options
@debug_option
@handle_errors
def drift_cmd(base, aligned, tuned, out, include, k, energy, max_rank, tol, exact, intruder_k, intruder_eps, device,
              overwrite, progress, plots, debug):
    """Does TUNED, a fine-tune of ALIGNED, undo ALIGNED's safety alignment of BASE?

    Per matrix, compares the new change ΔT = TUNED − ALIGNED with the alignment change ΔA = ALIGNED − BASE:
    the share of ΔT's energy in ΔA's top singular directions, the fraction of ΔA it cancels, the angles
    between their top subspaces and the intruder dimensions of TUNED, each against its chance level, with
    95% bootstrap intervals over matrices. BASE and ALIGNED are checkpoints (as for `pysafe analyze`);
    TUNED is a checkpoint or a PEFT LoRA adapter trained on ALIGNED.
    """
    from pysafe._atomic import atomic_dir
    from pysafe._progress import wanted
    from pysafe.drift import drift
    from pysafe.report.drift import DRIFT_FILES, write_drift_files

    def report_pairs(names):
        click.echo(f"pre-flight: {len(names)} matrices to analyse", err=True)

    with atomic_dir(out, overwrite=overwrite, planned=DRIFT_FILES, log=lambda m: click.echo(m, err=True)) as stage:
        bar = _Progress(wanted(progress))
        try:
            res = drift(base, aligned, tuned, k=k, energy=energy, max_rank=max_rank, tol=tol, exact=exact,
                        intruder_k=intruder_k,
                        intruder_eps=intruder_eps, include=include, device=device, progress=bar,
                        on_pairs=report_pairs)
        finally:
            bar.close()
        write_drift_files(res, stage.path, run_id=stage.run_id, plots=plots)
    click.echo(res.summary["verdict"])
    click.echo(f"{len(res.records)} matrices analysed, {len(res.skipped)} skipped in {res.seconds:.1f} s "
               f"({res.scheme} names) -> {out}/drift.json")

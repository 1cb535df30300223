"""``pysafe eval CKPT``: the safety table of one or more lab checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from pysafe.cli.options import check_device, debug_option, device_option, handle_errors


@click.command("eval")
@click.argument("ckpts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--sets", default=None, help="Comma-separated test sets (default: all of them).")
@click.option("--n", "n", type=click.IntRange(min=1), default=2000, show_default=True, help="Samples per test set.")
@click.option("--attack/--no-attack", default=True, show_default=True,
              help="Add the adversarial soft-token column (std_unsafe, docs/analyses.md A1-A7).")
@click.option("--attack-n", type=click.IntRange(min=1), default=None,
              help="Samples attacked (default: --n, as many as every other column).")
@click.option("--attack-tokens", type=click.IntRange(min=1), default=2, show_default=True, help="Soft tokens.")
@click.option("--attack-steps", type=click.IntRange(min=1), default=10, show_default=True, help="Attack steps.")
@click.option("--attack-eps", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Per-token budget as a multiple of the mean letter-embedding norm; repeat to sweep "
                   "(e.g. --attack-eps 0.25 --attack-eps 1 --attack-eps 4). Default 1.")
@click.option("--attack-norm", type=click.Choice(["l2", "linf"]), default="l2", show_default=True)
@click.option("--attack-placement", type=click.Choice(["auto", "insert", "overlay"]), default="auto", show_default=True,
              help="insert: a soft block before EOT (docs/analyses.md A5); overlay: δ added to the tokens before EOT. "
                   "auto: overlay when all texts have one length (the models then place outputs by absolute "
                   "position, which an insertion breaks), else insert.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              default="pysafe-eval.json", show_default=True,
              help="Where to write the full results as JSON (checkpoint directories are never written to).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_option()
@debug_option
@handle_errors
def eval_cmd(ckpts, sets, n, attack, attack_n, attack_tokens, attack_steps, attack_eps, attack_norm, attack_placement, json_out,
             batch_size, device, debug):
    """Evaluate lab checkpoints on whole test sets and print the paper's safety table.

    Each answer is classified as follows (exactly compliant), refuses (exactly the refusal) or other;
    the jailbreak columns are attack success, i.e. compliance on unsafe inputs. Under each row: the 95%
    Wilson score interval of every rate (it narrows as --n grows). The soft-token column (adv) is scored
    on block 1 only, on the std_unsafe inputs whose unsafe operators are in pair 1; adv:clean is the same
    inputs unattacked. The JSON adds *_ci95 fields, table_ci95 and table_n.
    """
    from pysafe.lab import ckpt as C
    from pysafe.lab.data import DataRecipe
    from pysafe._atomic import write_json
    from pysafe.lab.evaluate import format_table, safety_table

    check_device(device)
    set_list = [s.strip() for s in sets.split(",") if s.strip()] if sets else None
    attack_opts = (dict(n=attack_n or n, n_soft=attack_tokens, n_steps=attack_steps, eps_factors=list(attack_eps) or [1.0],
                        norm=attack_norm, placement=attack_placement) if attack else None)
    from pysafe._progress import Bars
    from pysafe.lab.data import TEST_SETS

    tables, intervals, sizes, full = {}, {}, {}, {}
    n_sets = len(set_list or TEST_SETS)
    with Bars() as bars:
        task = bars.task("evaluating", total=len(ckpts) * n_sets)
        for ckpt in ckpts:
            model, cfg = C.load_checkpoint(ckpt)
            recipe = DataRecipe.from_dict(cfg["data"])
            (bars.log if bars.shown else lambda m: click.echo(m, err=True))(
                f"evaluating {ckpt} ({cfg.get('stage', '?')}) on {n} samples per set ...")

            def step(k, total, name, ckpt=ckpt):
                task.advance(note=f"{Path(ckpt).name}: {name}" + (" (then the attack)" if k == total and attack else ""))

            res = safety_table(model, recipe, sets=set_list, n=n, batch_size=batch_size, device=device,
                               attack=attack_opts, progress=step)
            _record(tables, full, ckpt, res)
            label = Path(ckpt).name or str(ckpt)
            intervals[label], sizes[label] = res["table_ci95"], res["table_n"]
    click.echo(format_table(tables, intervals, sizes))
    for label, res in full.items():
        sweep = (res.get("adversarial") or {}).get("sweep") or []
        if len(sweep) > 1:
            click.echo(f"{label}: soft-token attack success by budget: "
                       + ", ".join(f"{s['eps_factor']:g}x -> {100 * s['success']:.1f}%" for s in sweep))
    write_json(json_out, full if len(ckpts) > 1 else next(iter(full.values())))
    click.echo(f"wrote {json_out}")


def _record(tables: dict, full: dict, ckpt, res: dict) -> None:
    label = Path(ckpt).name or str(ckpt)
    tables[label] = res["table"]
    full[label] = {"checkpoint": str(ckpt), **res}

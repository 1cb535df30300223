"""``pysafe analyze BASE TUNED``: the weights-only report (docs/metrics.md)."""

from __future__ import annotations

from pathlib import Path

import click

from pysafe.cli.options import (cache_options, dataclass_options, debug_option, echo_cache, handle_errors,
                                open_base_cache, ray_option, report_options)
from pysafe.weights import Options


class _Progress:
    """The tensors-done bar of ``compare`` (rich, on stderr): tensors done / total and GB read."""

    def __init__(self, enabled: bool):
        from pysafe._progress import Bars

        self.bars = Bars(enabled)
        self.task = None

    def __call__(self, done, total, bytes_done, bytes_total, name):
        if not self.bars.shown:
            return
        if self.task is None:
            self.bars.__enter__()
            self.task = self.bars.task("tensors", total)
        self.task.update(completed=done, total=total, note=f"{bytes_done / 1e9:.2f}/{bytes_total / 1e9:.2f} GB  "
                                                           f"{name[-40:]}")
        if done == total:
            self.close()

    def close(self):
        if self.task is not None:
            self.bars.__exit__(None, None, None)
            self.task = None


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="pysafe-report", show_default=True,
              help="Report directory (index.html, summary.json, results.h5, plots/).")
@dataclass_options(Options, into="opts",
                   help_overrides={"device": "Where the SVDs and the activation capture run: cpu, cuda or cuda:N."})
@report_options
@click.option("--prompts", "prompt_files", type=click.Path(dir_okay=False), multiple=True,
              help="Also capture activations of both models (HF Llama-family checkpoints, needs pysafe[hf]) on "
                   "these prompts: JSONL with text and group, or text files (one prompt per line, group = file "
                   "name). Needs 'safe' and 'unsafe' groups. Adds the cluster and row-space analyses.")
@click.option("--builtin-prompts", is_flag=True,
              help="The same with pysafe's small operator:operand prompt set (safe, unsafe, base64 jailbreaks).")
@click.option("--hook", default="mlp_act", show_default=True, help="Hook point of the cluster analysis.")
@click.option("--positions", type=click.Choice(["last", "window", "prompt_mean"]), default="last", show_default=True,
              help="Prompt positions pooled for the activation analyses.")
@cache_options
@ray_option("one task per layer")
@click.option("--feature-cache", type=click.Path(dir_okay=False), default=None,
              help="HDF5 file caching pooled activations by (checkpoint, prompts, hook, positions) across runs.")
@debug_option
@handle_errors
def analyze(base, tuned, out, opts, overwrite, progress, plots, prompt_files, builtin_prompts, hook, positions,
            cache_dir, no_cache, ray, feature_cache, debug):
    """Compare BASE and TUNED checkpoints tensor by tensor: what did fine-tuning change?

    BASE and TUNED are checkpoint directories or files: model.safetensors, a sharded
    model.safetensors.index.json, a directory of *.safetensors, a PEFT adapter (TUNED only),
    or PyTorch .bin/.pth state dicts (read with torch.load(weights_only=True)).
    """

    from pysafe._atomic import atomic_dir
    from pysafe.report import REPORT_FILES, format_table, write_report_files
    from pysafe.weights import compare

    if ray is not None:
        from pysafe.distributed import check_available

        check_available(ray)  # a bad address or a missing Ray fails here, before any work

    prompts = None
    if prompt_files or builtin_prompts:
        from pysafe.analysis.hf import builtin_prompts as _builtin
        from pysafe.analysis.hf import read_prompts

        prompts = (read_prompts(prompt_files) if prompt_files else []) + (_builtin() if builtin_prompts else [])
        for side, path in (("BASE", base), ("TUNED", tuned)):
            if not Path(path).is_dir():
                raise click.BadParameter(f"{path}: activation analyses need HF checkpoint directories "
                                         f"(config.json, tokenizer, weights)", param_hint=side)
    from pysafe._progress import wanted

    show = wanted(progress)
    def report_preflight(pre):
        for line in pre.lines():
            click.echo(f"pre-flight: {line}", err=True)
        click.echo(f"pre-flight: {len(pre.pairs)} tensors to analyse", err=True)

    cache = open_base_cache(cache_dir, no_cache)
    planned = REPORT_FILES + (ACTIVATION_FILES if prompts is not None else ())
    # the staging directory is made first: an unwritable --out fails before any work
    with atomic_dir(out, overwrite=overwrite, planned=planned, log=lambda m: click.echo(m, err=True)) as stage:
        bar = _Progress(show)
        try:
            if ray is not None:
                from pysafe.distributed import compare_on_ray

                cmp = compare_on_ray(base, tuned, ray, progress=bar, on_preflight=report_preflight, cache=cache,
                                     **vars(opts))
            else:
                cmp = compare(base, tuned, progress=bar, on_preflight=report_preflight, cache=cache, **vars(opts))
        finally:
            bar.close()
        table = format_table(cmp)
        if table:
            click.echo(table)
        write_report_files(cmp, stage.path, run_id=stage.run_id, plots=plots)
        if prompts is not None:
            _activations(base, tuned, prompts, stage.path / "activations", hook, positions, opts.device, feature_cache)
            from pysafe.report import write_index

            write_index(stage.path)  # the page now shows the activation figures too
    echo_cache(cache, debug)
    gb = cmp.bytes_read / 1e9
    click.echo(f"{len(cmp.records)} tensors analysed, {len(cmp.skipped)} skipped, {gb:.2f} GB read in "
               f"{cmp.seconds:.1f} s ({cmp.scheme} names) -> {out}/summary.json")
    if cmp.device is not None:
        click.echo(f"engine on {cmp.device['name']}: peak device memory {cmp.device['peak_bytes'] / 2**30:.2f} GiB",
                   err=True)
    if prompts is not None:
        click.echo(f"activation analyses -> {Path(out) / 'activations'}/")


#: the files of OUT/activations/ (with --prompts or --builtin-prompts)
ACTIVATION_FILES = tuple(f"activations/{f}" for f in ("clusters_base.json", "clusters_base.png", "clusters_tuned.json",
                                                      "clusters_tuned.png", "rowspace.json", "rowspace.png"))


def _activations(base, tuned, prompts, stage, hook, positions, device, feature_cache=None):
    """Clusters of both models and the row space of TUNED, written to ``stage`` (OUT/activations/ in the
    report being built)."""
    from pysafe.analysis.cache import FeatureCache, checkpoint_fingerprint
    from pysafe.analysis.clusters import plot_clusters
    from pysafe.analysis.hf import hf_cluster_analysis, hf_row_space, load_hf
    from pysafe.analysis.subspaces import plot_row_space
    from pysafe._atomic import write_json

    stage.mkdir(parents=True)
    mb, tok = load_hf(base, device)
    mt, tok_t = load_hf(tuned, device)
    n_groups = {g: sum(p["group"] == g for p in prompts) for g in dict.fromkeys(p["group"] for p in prompts)}
    click.echo(f"activations: {len(prompts)} prompts ({', '.join(f'{g} {k}' for g, k in n_groups.items())}), "
               f"hook {hook}, positions {positions}", err=True)
    cache = FeatureCache(feature_cache) if feature_cache else None
    keys = {"base": checkpoint_fingerprint(base), "tuned": checkpoint_fingerprint(tuned)}
    for label, model, tk in (("base", mb, tok), ("tuned", mt, tok_t)):
        res = hf_cluster_analysis(model, tk, prompts, hook=hook, positions=positions, cache=cache, model_key=keys[label])
        res["checkpoint"] = str(base if label == "base" else tuned)
        write_json(stage / f"clusters_{label}.json", res)
        plot_clusters(res, stage / f"clusters_{label}.png", f"{label}: {hook} ({positions})")
        last = res["layers"][-1]
        click.echo(f"{label}: last-layer τ " + ", ".join(f"{g} {r['tau_mean'][last]:+.3f}" for g, r in res["groups"].items()))
    rs = hf_row_space(mb, mt, tok_t, prompts, positions=positions, cache=cache, model_key=keys["tuned"])
    if cache is not None:
        cache.flush()
    write_json(stage / "rowspace.json", rs)
    plot_row_space(rs, stage / "rowspace.png", f"row space of gate_proj ({positions})")

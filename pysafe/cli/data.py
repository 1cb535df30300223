"""``pysafe data``: generate and inspect the lab's cached test sets."""

from __future__ import annotations

import dataclasses

import click

from pysafe.cli.options import debug_option, handle_errors

def recipe_for_preset(preset: str, seed: int | None = None):
    """The data recipe of a preset (name or TOML path); ``seed`` overrides the recipe's seed.

    Raises:
        ValueError: unknown preset or bad [data] table.
    """
    from pysafe.lab.config import load_preset
    from pysafe.lab.data import DataRecipe

    recipe = DataRecipe.from_dict(load_preset(preset).get("data", {}))
    return recipe if seed is None else dataclasses.replace(recipe, seed=seed)


@click.group("data")
def data_cmd():
    """Generate and inspect the synthetic safety data (docs/lab.md)."""


@data_cmd.command("generate")
@click.option("--preset", default="cpu", show_default=True, help="Preset name (paper, cpu, tiny) or TOML path.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write (must not exist).")
@click.option("--n", "n", type=click.IntRange(min=1), default=2000, show_default=True, help="Samples per test set.")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 9), default=None, help="Override the recipe's seed.")
@click.option("--set", "sets", multiple=True, help="Only this test set (repeatable; default: all).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
@debug_option
@handle_errors
def generate_cmd(preset, out, n, seed, sets, overwrite, debug):
    """Write every test set to OUT/test_sets.h5 with OUT/manifest.json."""
    from pysafe.lab import data as D

    for s in sets:
        if s not in D.TEST_SETS:
            raise click.BadParameter(f"unknown test set {s!r}; known: {', '.join(D.TEST_SETS)}", param_hint="--set")
    recipe = recipe_for_preset(preset, seed)
    path = D.generate(recipe, out, n_test=n, sets=sets or D.TEST_SETS, overwrite=overwrite)
    m = D.read_manifest(path)
    click.echo(f"wrote {len(m['sets'])} test sets × {n} samples to {path} (sha256 {m['sha256'][:12]}…)")


@data_cmd.command("show")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--set", "name", default="std_unsafe", show_default=True, help="Test set to show.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Number of samples.")
@debug_option
@handle_errors
def show_cmd(cache_dir, name, k, debug):
    """Print K decoded samples of one cached test set, with their labels and why."""
    from pysafe.lab import data as D
    from pysafe.lab.vocab import decode

    m = D.read_manifest(cache_dir)
    if name not in m["sets"]:
        raise click.BadParameter(f"test set {name!r} is not in {cache_dir}; cached: {', '.join(m['sets'])}",
                                 param_hint="--set")
    b = D.load_cached(cache_dir, name)
    spec = m["sets"][name]
    click.echo(f"{name}: {len(b)} samples; category {spec['category']}, modifier {spec['modifier']}, "
               f"attack input x_{spec['attack']}")
    click.echo("operator classes: A always safe, U always unsafe, B unsafe on unsafe-branch text "
               "(B* = B on unsafe-branch text, i.e. unsafe); duplicates shown as dup(=base)")
    for i in range(min(k, len(b))):
        why = D.describe(b, i)
        L = int(b.text_len[i])
        click.echo(f"\n[{i}] PCFG {why['pcfg']}, text from the {why['text_grammar']} grammar "
                   f"({'unsafe' if why['unsafe_branch_text'] else 'safe'}-branch text), L={L}, "
                   f"apply_second={int(why['apply_second'])}")
        click.echo(f"  safe version   {'UNSAFE' if why['safe_ops_unsafe'] else 'safe  '}  {why['safe_ops']}")
        click.echo(f"    x: {decode(b.x_safe[i], collapse_pad=True)}")
        click.echo(f"  unsafe version {'UNSAFE' if why['unsafe_ops_unsafe'] else 'safe  '}  {why['unsafe_ops']}")
        click.echo(f"    x (compliant): {decode(b.x_unsafe_target[i], collapse_pad=True)}")
        click.echo(f"    x (refusal):   {decode(b.x_unsafe[i], collapse_pad=True)}")
        click.echo(f"  attack input is {'UNSAFE' if why['attack_unsafe'] else 'safe'}")

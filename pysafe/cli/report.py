"""``pysafe report DIR``: rebuild DIR/index.html from the report files in DIR."""

from __future__ import annotations

from pathlib import Path

import click

from pysafe.cli.options import debug_option, handle_errors


@click.command("report")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--markdown", is_flag=True,
              help="Print the safety table (with 95% intervals) and the claims as Markdown instead (writes nothing).")
@debug_option
@handle_errors
def report_cmd(directory, markdown, debug):
    """Rebuild DIRECTORY/index.html, the report page, from the files in DIRECTORY (a folder written by
    `pysafe analyze`, `track`, `drift`, `demo`, `reproduce`, `clusters`, `colspace`, `rowspace` or `lipschitz`). Only
    index.html is written; an index.html that pysafe did not write is left alone (an error)."""
    from pysafe.report.html import results_markdown, write_index

    if markdown:
        click.echo(results_markdown(directory), nl=False)
        return
    for sub in sorted(Path(directory).glob("analyze/*/summary.json")):  # the per-fine-tune pages first
        write_index(sub.parent)
    click.echo(f"wrote {write_index(directory)}")

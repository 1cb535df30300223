"""The ``pysafe`` command: one module per subcommand."""

from __future__ import annotations

import click

from pysafe._version import __version__
from pysafe.cli.analyze import analyze
from pysafe.cli.make_pair import make_pair_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pysafe")
def main():
    """pysafe: what did safety fine-tuning change in this model?"""


main.add_command(analyze)
main.add_command(make_pair_cmd)

__all__ = ["main"]

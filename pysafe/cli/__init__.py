"""The ``pysafe`` command: one module per subcommand."""

from __future__ import annotations

import click

from pysafe._version import __version__
from pysafe.cli.analyze import analyze
from pysafe.cli.clusters import clusters_cmd
from pysafe.cli.figures import colspace_cmd, lipschitz_cmd, rowspace_cmd
from pysafe.cli.data import data_cmd
from pysafe.cli.drift import drift_cmd
from pysafe.cli.eval import eval_cmd
from pysafe.cli.make_pair import make_pair_cmd
from pysafe.cli.report import report_cmd
from pysafe.cli.reproduce import demo_cmd, reproduce_cmd
from pysafe.cli.track import track_cmd
from pysafe.cli.train import train_cmd
from pysafe.cli.validate_drift import validate_drift_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pysafe")
def main():
    """pysafe: what did safety fine-tuning change in this model?"""


main.add_command(analyze)
main.add_command(drift_cmd)
main.add_command(make_pair_cmd)
main.add_command(data_cmd)
main.add_command(train_cmd)
main.add_command(eval_cmd)
main.add_command(reproduce_cmd)
main.add_command(demo_cmd)
main.add_command(clusters_cmd)
main.add_command(colspace_cmd)
main.add_command(rowspace_cmd)
main.add_command(lipschitz_cmd)
main.add_command(report_cmd)
main.add_command(track_cmd)
main.add_command(validate_drift_cmd)

__all__ = ["main"]

"""``python -m pysafe``: the ``pysafe`` command."""

from pysafe.cli import main

main(prog_name="pysafe")

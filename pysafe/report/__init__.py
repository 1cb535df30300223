"""Writing an analysis to disk (docs/report-directory.md): summary.json, results.h5, plots/*.png, index.html.

The report is written whole into a staging directory beside the target and takes its place by one
rename (:func:`pysafe._atomic.atomic_dir`): the target holds the complete old report, the complete new
one, or nothing; files of the user's in it are kept. summary.json, results.h5 and every plot carry the
same ``run_id``, also recorded in the report's ``.pysafe-manifest.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pysafe._atomic import atomic_dir, write_json
from pysafe.report.h5 import read_h5, write_h5
from pysafe.report.html import build_index, write_index
from pysafe.report.plots import PLOT_FILES, write_plots
from pysafe.report.summary import summary_dict
from pysafe.report.table import format_table

#: the files of a report (relative paths); activations/ holds more with ``analyze --prompts``
REPORT_FILES = ("index.html", "summary.json", "results.h5") + tuple(f"plots/{p}" for p in PLOT_FILES)


def write_report_files(cmp, directory: str | os.PathLike, *, run_id: str | None = None, plots: bool = True) -> Path:
    """Write summary.json, results.h5, plots/ and index.html into ``directory`` (no staging: a directory
    being built; call :func:`write_index` again after adding files to it)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    summary = summary_dict(cmp)
    if run_id is not None:
        summary["run_id"] = run_id
    write_h5(cmp, d / "results.h5", run_id=run_id)
    (d / "plots").mkdir(exist_ok=True)
    if plots:
        write_plots(cmp, d / "plots", run_id=run_id)
    write_json(d / "summary.json", summary, indent=1)
    write_index(d)
    return d


def write_report(cmp, out: str | os.PathLike, *, overwrite: bool = False, plots: bool = True, log=None) -> Path:
    """Write summary.json, results.h5, plots/ and index.html for a :class:`~pysafe.weights.Comparison`,
    atomically.

    Raises:
        FileExistsError: ``out`` already holds files and ``overwrite`` is false.
        OSError: (:class:`pysafe._atomic.OutDirError`) ``out`` cannot be written; ``out`` is unchanged.
    """
    with atomic_dir(out, overwrite=overwrite, planned=REPORT_FILES, log=log) as stage:
        write_report_files(cmp, stage.path, run_id=stage.run_id, plots=plots)
    return Path(out)


__all__ = ["write_report", "write_report_files", "summary_dict", "format_table", "write_h5", "read_h5",
           "write_plots", "write_index", "build_index", "REPORT_FILES"]

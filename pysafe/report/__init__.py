"""Writing an analysis to disk (engine.md §6): summary.json, results.h5, plots/*.png.

Everything is written into a staging directory beside the target and moved in by rename, with
summary.json last: a directory that has a summary.json holds a complete report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pysafe.report.h5 import write_h5
from pysafe.report.plots import write_plots
from pysafe.report.summary import summary_dict, write_json
from pysafe.report.table import format_table

OUTPUTS = ("results.h5", "plots", "summary.json")  # summary.json last: the completeness marker


def write_report(cmp, out: str | os.PathLike, *, overwrite: bool = False, plots: bool = True) -> Path:
    """Write summary.json, results.h5 and plots/ for a :class:`~pysafe.weights.Comparison`.

    Raises:
        FileExistsError: ``out`` already holds files and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace "
                              "the pysafe outputs in it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.pysafe-tmp-", dir=out.parent))
    try:
        summary = summary_dict(cmp)
        write_h5(cmp, stage / "results.h5")
        (stage / "plots").mkdir()
        if plots:
            write_plots(cmp, stage / "plots")
        write_json(summary, stage / "summary.json")
        out.mkdir(exist_ok=True)
        if (out / "summary.json").exists():  # an old report stops looking complete first
            os.unlink(out / "summary.json")
        for name in OUTPUTS:
            dst = out / name
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(stage / name, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


__all__ = ["write_report", "summary_dict", "format_table", "write_h5", "write_plots"]

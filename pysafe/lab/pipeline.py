"""Where the preset helpers used by the bench scripts lived; they are in :mod:`pysafe.lab.config` now (the
end-to-end runs moved to :mod:`pysafe.pipeline`, above the analyses)."""

from pysafe.lab.config import DEMO_DIR, PAPER_LRS, stage_settings  # noqa: F401

"""pysafe: what did safety fine-tuning change in a model, and why do jailbreaks get through?

Functions:
    compare(base, tuned, **options) -> Comparison
        Compare two checkpoints tensor by tensor: ΔW's norm, spectrum and position relative to the base
        weights' top singular directions, with chance levels (options: see ``pysafe.Options``).
    drift(base, aligned, tuned, **options) -> DriftResult
        Does a fine-tune of an aligned model (full or a LoRA adapter) undo the alignment change
        ALIGNED − BASE? Per-matrix overlap, projection, angles and intruder dimensions, with chance levels
        and bootstrap intervals (docs/drift.md).
    write_report(cmp, out)              summary.json, results.h5, plots/ and index.html, written atomically.
    track(base, ckpts, **options) -> Trajectory
        compare() for every checkpoint of a training run (a run directory's steps/step_N, or paths in
        order), W_base's decompositions computed once; ``ray="local:4"`` spreads it over a Ray cluster.
    write_track_report(traj, out)       track.json, track.csv, plots/ and index.html, written atomically.
    make_pair(out, preset="small")      a synthetic base/tuned pair with a planted ΔW.
    read_header(path), read_tensor(path, name)   safetensors header and one tensor (upcast to f32/f64).
    truncated_svd(a, rank=k)           top-k SVD by the native engine (or energy=0.9).
    pairwise_distances(a, b), distance_summary(a, labels), write_distance_matrix(path, a)
                                        exact distances between activation sets.
    build_info()                        what the native core was built with.

Classes: Comparison (``.records``, ``.record(name)``, ``.to_pandas()``), Options, Checkpoint
(``Checkpoint.open(path)``), PeftAdapter; Trajectory and DriftResult (what ``track`` and ``drift`` return;
``help(pysafe.Trajectory)``, ``help(pysafe.DriftResult)``). Errors: ``pysafe.errors`` (PysafeError and its subclasses,
also importable from ``pysafe``). Command line: ``pysafe --help``. Documentation: the repository's docs/.
The native core (``pysafe._core``) is internal: call these instead.
"""

from pysafe._loader import _core  # noqa: F401  (loads the native core and its BLAS)
from pysafe._version import __version__
from pysafe.drift import DriftResult, drift
from pysafe.distances import distance_summary, pairwise_distances, write_distance_matrix
from pysafe.checkpoint import Checkpoint, PeftAdapter, detect_scheme, name_info
from pysafe.errors import (  # noqa: F401  (re-exported; see pysafe.errors)
    CheckpointError,
    ClusterError,
    DeviceUnavailableError,
    HeaderError,
    InternalError,
    PysafeError,
    ShapeMismatchError,
    ShardIndexError,
    TensorNotFoundError,
)
from pysafe.linalg import build_info, read_header, read_tensor, truncated_svd
from pysafe.report import write_report
from pysafe.report.track import write_track_report
from pysafe.synthetic import make_pair
from pysafe.trajectory import Trajectory, track
from pysafe.weights import Comparison, Options, compare

#: the public names; the error classes are in ``pysafe.errors`` (and importable from here) but left out of
#: __all__ so that ``help(pysafe)`` shows the functions, not pages of inherited exception methods; so are the
#: result classes that only come back from a function (Trajectory from track, DriftResult from drift)
__all__ = [
    "__version__",
    "compare",
    "drift",
    "write_report",
    "track",
    "write_track_report",
    "make_pair",
    "read_header",
    "read_tensor",
    "truncated_svd",
    "pairwise_distances",
    "distance_summary",
    "write_distance_matrix",
    "build_info",
    "detect_scheme",
    "name_info",
    "Comparison",
    "Options",
    "Checkpoint",
    "PeftAdapter",
]

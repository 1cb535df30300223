"""pysafe: what did safety fine-tuning change in a model, and why do jailbreaks get through?

The public API. The native core (``pysafe._core``) is internal: call these instead.
"""

from pysafe._loader import _core  # noqa: F401  (loads the native core and its BLAS)
from pysafe._version import __version__
from pysafe.distances import distance_summary, pairwise_distances, write_distance_matrix
from pysafe.checkpoint import Checkpoint, PeftAdapter, detect_scheme, name_info
from pysafe.errors import (
    CheckpointError,
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
from pysafe.synthetic import make_pair
from pysafe.weights import Comparison, Options, compare

__all__ = [
    "__version__",
    "compare",
    "Comparison",
    "Options",
    "Checkpoint",
    "PeftAdapter",
    "detect_scheme",
    "name_info",
    "read_header",
    "read_tensor",
    "truncated_svd",
    "build_info",
    "write_report",
    "make_pair",
    "pairwise_distances",
    "distance_summary",
    "write_distance_matrix",
    "PysafeError",
    "CheckpointError",
    "HeaderError",
    "ShardIndexError",
    "TensorNotFoundError",
    "ShapeMismatchError",
    "DeviceUnavailableError",
    "InternalError",
]

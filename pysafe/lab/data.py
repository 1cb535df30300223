"""Synthetic data of the safety lab: pretraining and safety fine-tuning samples (docs/lab.md), in three
modules re-exported here as one API: :mod:`~pysafe.lab.recipe` (categories, test sets, the recipe, RNG
streams), :mod:`~pysafe.lab.samplers` (the numba samplers) and :mod:`~pysafe.lab.testsets` (the on-disk
cache of test sets).

The samplers' sample layout is described in :mod:`~pysafe.lab.samplers`.
"""

from pysafe.lab.recipe import (CATEGORIES, MODES, TEST_SET_SPECS, TEST_SETS, TRAIN_CATEGORIES, DataRecipe,  # noqa: F401
                               mode_probs, stream_seed)
from pysafe.lab.samplers import (PretrainBatch, SafetyBatch, describe, pretrain_batch, pretrain_eval_batch,  # noqa: F401
                                 safety_batch, test_set)
from pysafe.lab.testsets import generate, load_cached, read_manifest  # noqa: F401

__all__ = ["CATEGORIES", "DataRecipe", "MODES", "PretrainBatch", "SafetyBatch", "TEST_SETS", "TEST_SET_SPECS",
           "TRAIN_CATEGORIES", "describe", "generate", "load_cached", "mode_probs", "pretrain_batch",
           "pretrain_eval_batch", "read_manifest", "safety_batch", "stream_seed", "test_set"]

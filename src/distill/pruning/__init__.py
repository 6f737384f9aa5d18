"""Structured pruning: a smaller student cut from its teacher by calibration importance (Minitron-style).

``prune(model, calibration_batches(rows, tokenizer), target=0.5)`` scores MLP neurons, attention heads /
KV groups, hidden channels and blocks on calibration rows, cuts the teacher to a shape (explicit, or
the best of several depth/width mixes within a parameter budget), re-fits the kept weights by least
squares, and returns a standard ``transformers`` model plus a record of what survived, which
intermediate-layer distillation reads (``config.distill_pruning``). See ``docs/pruning.md``.
"""

from typing import TYPE_CHECKING

from distill._lazy import lazy_exports

# Imported on first use: the pruning modules import torch, and ``distill prune --help`` should not wait for it.
if TYPE_CHECKING:
    from distill.pruning.architecture import (
        PruneShape,
        UnsupportedArchitectureError,
        check_prunable,
        count_parameters,
        shape_of,
    )
    from distill.pruning.importance import Importance, calibration_loss, measure_importance
    from distill.pruning.search import Candidate, PruneResult, calibration_batches, candidate_shapes, prune
    from distill.pruning.surgery import RECORD_KEY, PrunedModel, check_shape, kept_units, prune_to_shape, pruned_config

__all__ = [
    "RECORD_KEY",
    "Candidate",
    "Importance",
    "PruneResult",
    "PruneShape",
    "PrunedModel",
    "UnsupportedArchitectureError",
    "calibration_batches",
    "calibration_loss",
    "candidate_shapes",
    "check_prunable",
    "check_shape",
    "count_parameters",
    "kept_units",
    "measure_importance",
    "prune",
    "prune_to_shape",
    "pruned_config",
    "shape_of",
]

__getattr__ = lazy_exports(__name__, ("architecture", "importance", "search", "surgery"), __all__)

"""Distillation losses in three forms that compute the same values.

* Dense (:func:`distillation_loss` and the named :func:`generalized_jsd`, :func:`forward_kl`, ...):
  both models' logits in.
* Sparse (:func:`sparse_distillation_loss`): the teacher as top-k ids and log-probs (+ tail mass).
* Fused (:func:`fused_distillation_loss`, :class:`FusedDistillationLoss`): the student's hidden
  states and head, the teacher as a :class:`TeacherHead` or :class:`SparseTargets`; chunked so the
  ``[tokens x vocab]`` logits never exist.
* Hidden states (:func:`hidden_state_loss`): intermediate-layer distillation, the student's mapped
  layer outputs matched to the teacher's (cosine or relative squared error).

Pure torch: nothing here imports transformers.
"""

from distill.losses.dense import (
    cross_entropy,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from distill.losses.divergences import DIVERGENCE_NAMES, DIVERGENCES, Divergence
from distill.losses.fused import FusedDistillationLoss, default_chunk_size, fused_distillation_loss
from distill.losses.hidden import HIDDEN_LOSSES, HiddenStateOutput, hidden_state_loss
from distill.losses.objective import DistillationOutput, NonFiniteInputError, Objective
from distill.losses.sparse import sparse_distillation_loss
from distill.losses.targets import OutputHead, SparseTargets, TeacherHead
from distill.losses.vocab import VocabularyMismatchError

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_NAMES",
    "DistillationOutput",
    "HIDDEN_LOSSES",
    "HiddenStateOutput",
    "Divergence",
    "FusedDistillationLoss",
    "NonFiniteInputError",
    "Objective",
    "OutputHead",
    "SparseTargets",
    "TeacherHead",
    "VocabularyMismatchError",
    "cross_entropy",
    "default_chunk_size",
    "distillation_loss",
    "forward_kl",
    "fused_distillation_loss",
    "generalized_jsd",
    "hidden_state_loss",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "sparse_distillation_loss",
    "total_variation",
]

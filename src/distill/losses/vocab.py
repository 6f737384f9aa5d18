"""Checks that teacher and student targets index the same vocabulary, before any loss is computed.

Token-level distillation compares two distributions entry by entry, so it is only defined when
entry ``v`` means the same token on both sides. Heads often have more rows than the tokenizer has
tokens (Qwen2.5 pads 151,665 tokens to 151,936 or 152,064 rows): the losses then use the shared
range ``[0, vocab_size)`` and these checks make sure no label or teacher target falls outside it.
Whether two *tokenizers* agree is checked one layer down, in :mod:`distill.models.vocab`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.targets import SparseTargets

__all__ = ["VocabularyMismatchError", "check_labels", "check_sparse_targets", "resolve_vocab_size"]

_HOW_TO_SHARE = (
    "If both models use the same tokenizer and the extra rows are padding (Qwen pads 151,665 tokens to "
    "151,936 or 152,064 rows), pass vocab_size=len(tokenizer); distill.models.shared_vocab_size() checks the two "
    "tokenizers and returns it. If the tokenizers differ, token-level KD is not defined: distill on teacher "
    "generations (sequence-level KD) instead."
)


class VocabularyMismatchError(ValueError):
    """Teacher and student do not index the same vocabulary."""


def resolve_vocab_size(student_rows: int, teacher_rows: int | None, vocab_size: int | None) -> int:
    """The number of leading vocabulary rows both sides use.

    Args:
        student_rows: rows of the student's head (last dim of its logits).
        teacher_rows: rows of the teacher's head, or ``None`` for a sparse teacher.
        vocab_size: the shared range requested by the caller, or ``None`` for "all rows".

    Raises:
        VocabularyMismatchError: the heads differ in size and no ``vocab_size`` says which rows are
            shared, or ``vocab_size`` exceeds a head.
    """
    if vocab_size is None:
        if teacher_rows is not None and teacher_rows != student_rows:
            raise VocabularyMismatchError(
                f"The student's head has {student_rows} vocabulary rows and the teacher's has {teacher_rows}. "
                + _HOW_TO_SHARE
            )
        return student_rows
    if vocab_size > student_rows or (teacher_rows is not None and vocab_size > teacher_rows):
        teacher_part = "" if teacher_rows is None else f" and the teacher's {teacher_rows}"
        raise VocabularyMismatchError(
            f"vocab_size={vocab_size} is larger than a head: the student's has {student_rows} rows{teacher_part}. "
            "Pass the tokenizer's length, which must fit in both heads."
        )
    return vocab_size


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Refuse labels outside ``[0, vocab_size)`` (other than ``ignore_index``).

    A label in the padding rows means the tokenizer has more tokens than the shared range, or the
    data was tokenized with another tokenizer; either way the loss would be silently wrong.
    """
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integer token ids; got dtype {labels.dtype}.")
    used = labels != ignore_index
    bad = used & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        bad_label = int(labels[bad][0])
        raise VocabularyMismatchError(
            f"Label id {bad_label} is outside the shared vocabulary [0, {vocab_size}) "
            f"({int(bad.sum())} such labels). Either the data was tokenized with a different tokenizer, "
            f"or vocab_size is smaller than the tokenizer; mask non-targets with ignore_index={ignore_index}."
        )


def check_sparse_targets(targets: SparseTargets, num_tokens: int, vocab_size: int) -> None:
    """Refuse sparse teacher targets that are malformed or that index outside the shared vocabulary.

    Args:
        targets: flattened targets, ``[N, k]`` ids and log-probs, optional ``[N]`` tail mass.
        num_tokens: ``N``, the number of student positions they must match.
        vocab_size: the shared vocabulary range.
    """
    ids, logprobs = targets.topk_ids, targets.topk_logprobs
    if ids.shape != logprobs.shape:
        raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_logprobs {tuple(logprobs.shape)} must have one shape.")
    if ids.shape[0] != num_tokens:
        raise ValueError(f"The teacher has targets for {ids.shape[0]} positions but the student has {num_tokens}.")
    if ids.dtype.is_floating_point:
        raise TypeError(f"topk_ids must be integer token ids; got dtype {ids.dtype}.")
    if num_tokens == 0:
        return
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise VocabularyMismatchError(
            f"Teacher top-k ids reach {int(ids.max())}, outside the shared vocabulary [0, {vocab_size}). "
            "The targets come from a teacher with a different tokenizer, or vocab_size is too small."
        )
    sorted_ids = ids.sort(dim=-1).values
    if ids.shape[-1] > 1 and bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
        raise ValueError("Teacher top-k ids repeat within a position; each position needs k distinct ids.")
    if targets.estimate:
        # Sampled weights are unbiased estimates: a single draw may sum above 1 (never NaN or +inf).
        if bool(torch.isnan(logprobs).any()) or bool((logprobs == math.inf).any()):
            raise ValueError("Sampled teacher targets hold NaN or +inf log-weights.")
        if targets.tail_mass is not None and bool((targets.tail_mass != 0).any()):
            raise ValueError("Sampled teacher targets cover the whole distribution: tail_mass must be 0 or None.")
        return
    mass = torch.logsumexp(logprobs.double(), dim=-1).exp()
    if bool((logprobs > 1e-4).any()) or bool((mass > 1.0 + 1e-3).any()):
        raise ValueError(
            "Teacher top-k values are not log-probabilities (their probabilities sum to up to "
            f"{float(mass.max()):.3g}). "
            "Pass log_softmax(teacher_logits) gathered at the top-k ids, not raw logits."
        )
    if targets.tail_mass is not None:
        tail = targets.tail_mass
        if tail.shape != (num_tokens,):
            raise ValueError(f"tail_mass must have shape ({num_tokens},); got {tuple(tail.shape)}.")
        if bool(((tail < 0) | (tail > 1)).any()):
            raise ValueError("tail_mass must be a probability in [0, 1] at every position.")

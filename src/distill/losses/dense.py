"""Dense form: both models' full logits in, a loss out.

The simplest form and the drop-in for TRL's ``generalized_jsd_loss``: it needs the
``[batch, seq, vocab]`` logits of both models in memory, so at large vocabularies prefer
:func:`distill.losses.fused_distillation_loss`, which computes the same values from hidden states
without ever building them.

``labels`` are aligned with the logits (the caller has already shifted them: ``labels[..., t]`` is
the token the logits at position ``t`` predict); positions labelled ``ignore_index`` (-100) are left
out, and the default reduction is the mean over the remaining positions (0 when none remain).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from distill.losses.objective import (
    DistillationOutput,
    Objective,
    Reduction,
    check_finite,
    reduce_token_losses,
    select_valid_rows,
    upcast,
)
from distill.losses.vocab import check_labels, resolve_vocab_size

__all__ = [
    "cross_entropy",
    "dense_objective_loss",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
]


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    divergence: str = "jsd",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> DistillationOutput:
    """``kd_weight * divergence(teacher, student) + ce_weight * CE(student, labels)`` from dense logits.

    Args:
        student_logits: ``[..., V_s]`` student logits (e.g. ``[batch, seq, vocab]``), any float dtype;
            computed in float32.
        teacher_logits: ``[..., V_t]`` teacher logits for the same positions; no gradient flows
            into them.
        labels: ``[...]`` next-token ids aligned with the logits, ``ignore_index`` where masked; or
            ``None`` to use every position (then ``ce_weight`` must be 0).
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl`` or
            ``tvd`` (see :mod:`distill.losses.divergences`).
        beta: JSD interpolation; 0 is forward KL, 1 reverse KL.
        alpha: skew of ``skew_kl`` / ``skew_reverse_kl``.
        temperature: divides both models' logits in the KD term; the loss is not scaled by T^2.
        kd_weight: weight of the divergence term.
        ce_weight: weight of the hard-label cross-entropy (at temperature 1).
        reduction: ``mean`` over unmasked positions, ``sum``, or ``none`` (``[...]`` per position,
            0 where masked).
        vocab_size: compare only the first ``vocab_size`` vocabulary entries; required when the heads
            differ in size (padding rows).
        ignore_index: label value of masked positions.

    Returns:
        :class:`DistillationOutput`; ``.loss`` is the differentiable objective.
    """
    objective = Objective.from_kwargs(
        divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
        vocab_size=vocab_size, ignore_index=ignore_index,
    )  # fmt: skip
    return dense_objective_loss(student_logits, teacher_logits, labels, objective, reduction=reduction)


def dense_objective_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    objective: Objective,
    *,
    reduction: Reduction = "mean",
) -> DistillationOutput:
    """:func:`distillation_loss` for an :class:`Objective` built once (the trainer's), not from keywords.

    Internal entry point, the dense twin of :func:`distill.losses.fused.fused_objective_loss`: the trainer holds
    its loss settings as one checked :class:`Objective` and hands it over as is. ``objective.vocab_size`` is
    checked against both logits' widths here (``None``: all columns, which must then be equal). Arguments and
    return value otherwise as :func:`distillation_loss`.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must cover the same positions."
        )
    vocab = resolve_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1], objective.vocab_size)
    if vocab != objective.vocab_size:
        objective = dataclasses.replace(objective, vocab_size=vocab)
    leading_shape = student_logits.shape[:-1]
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    labels_flat = _checked_labels(labels, objective, vocab)
    rows = select_valid_rows(labels_flat, student_flat.shape[0], objective.ignore_index)
    if rows is not None:
        student_flat, teacher_flat, labels_flat = student_flat[rows], teacher_flat[rows], labels_flat[rows]
    check_finite(student_flat, "Student logits")
    check_finite(teacher_flat, "Teacher logits")
    per_token = objective.token_losses(student_flat, labels_flat, teacher_logits=teacher_flat)
    return reduce_token_losses(per_token, objective, reduction, rows, leading_shape, labels is not None)


def _checked_labels(labels: Tensor | None, objective: Objective, vocab: int) -> Tensor | None:
    """Flattened labels after the vocabulary check; refuses CE without labels."""
    if labels is None:
        if objective.ce_weight:
            raise ValueError("ce_weight > 0 needs labels: pass the next-token ids (ignore_index where masked).")
        return None
    check_labels(labels, vocab, objective.ignore_index)
    return labels.reshape(-1)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Forward KL ``KL(teacher || student)`` from dense logits; arguments as in :func:`distillation_loss`."""
    return distillation_loss(student_logits, teacher_logits, labels, "forward_kl", temperature=temperature,
                             reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index).loss  # fmt: skip


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Reverse KL ``KL(student || teacher)`` from dense logits; arguments as in :func:`distillation_loss`."""
    return distillation_loss(student_logits, teacher_logits, labels, "reverse_kl", temperature=temperature,
                             reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index).loss  # fmt: skip


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """GKD's generalized JSD (beta=0 forward KL, beta=1 reverse KL), as TRL's ``generalized_jsd_loss``.

    Unlike TRL's ``reduction="batchmean"`` without labels (which divides by the batch size, i.e. sums
    over positions), the default here is always the mean per position.
    """
    return distillation_loss(student_logits, teacher_logits, labels, "jsd", beta=beta, temperature=temperature,
                             reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index).loss  # fmt: skip


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """DistiLLM's skew KL ``KL(P || alpha P + (1-alpha) Q)``; arguments as in :func:`distillation_loss`."""
    return distillation_loss(student_logits, teacher_logits, labels, "skew_kl", alpha=alpha, temperature=temperature,
                             reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index).loss  # fmt: skip


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """DistiLLM's skew reverse KL ``KL(Q || (1-alpha) P + alpha Q)``; arguments as in :func:`distillation_loss`."""
    return distillation_loss(student_logits, teacher_logits, labels, "skew_reverse_kl", alpha=alpha,
                             temperature=temperature, reduction=reduction, vocab_size=vocab_size,
                             ignore_index=ignore_index).loss  # fmt: skip


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|``; arguments as in :func:`distillation_loss`."""
    return distillation_loss(student_logits, teacher_logits, labels, "tvd", temperature=temperature,
                             reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index).loss  # fmt: skip


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Hard-label cross-entropy of the student, ``-log q(label)`` in nats, with the same masking.

    Args:
        student_logits: ``[..., V]`` logits.
        labels: ``[...]`` next-token ids aligned with the logits.
        reduction: ``mean`` over unmasked positions (0 when none), ``sum`` or ``none``.
        ignore_index: label value of masked positions.
    """
    check_labels(labels, student_logits.shape[-1], ignore_index)
    leading_shape = student_logits.shape[:-1]
    logits_flat = student_logits.reshape(-1, student_logits.shape[-1])
    rows = select_valid_rows(labels, logits_flat.shape[0], ignore_index)
    assert rows is not None
    logprobs = torch.log_softmax(upcast(logits_flat[rows]), dim=-1)
    per_token = -logprobs.gather(-1, labels.reshape(-1)[rows].unsqueeze(-1)).squeeze(-1)
    if reduction == "mean":
        return per_token.sum() / max(per_token.shape[0], 1)
    if reduction == "sum":
        return per_token.sum()
    return per_token.new_zeros(leading_shape.numel()).index_copy(0, rows, per_token).reshape(leading_shape)

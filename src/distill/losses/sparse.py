"""Sparse form: student logits against a teacher known only by its top-k tokens.

This is the form for teachers that ran once (an offline cache) or that live behind a server that
returns top-k log-probs. The distribution a top-k list implies is incomplete; how the missing tail
is handled is an explicit choice (``tail``), because each choice biases the objective differently:

* ``"bucket"`` (default): the divergence between the coarse-grained distributions over
  ``k + 1`` outcomes (the top-k tokens and "any other token"). The student's bucket mass is exact
  (from its full softmax); the teacher's is ``1 - sum(top-k probs)`` or the stored tail mass. By
  the data processing inequality this is a *lower bound* of the full divergence, exact when the
  teacher's tail is empty; it under-weights how the student spreads its tail mass, but keeps the
  total tail mass right. Needs ``temperature == 1`` (the tempered teacher's tail mass is unknown).
* ``"renormalize"``: both distributions restricted to the top-k and renormalised, i.e. the
  divergence between the conditionals given "the token is among the teacher's top-k". Exact at any
  temperature for that conditional, but blind to how much mass the student leaves outside the top-k
  (a student may put 90% of its mass elsewhere at zero loss), so pair it with a CE term.
"""

from __future__ import annotations

from torch import Tensor

from distill.losses.objective import (
    DistillationOutput,
    Objective,
    Reduction,
    TailMode,
    reduce_token_losses,
    select_valid_rows,
)
from distill.losses.targets import SparseTargets
from distill.losses.vocab import check_labels, check_sparse_targets, resolve_vocab_size

__all__ = ["check_estimate_objective", "prepare_sparse_targets", "sparse_distillation_loss"]


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    labels: Tensor | None = None,
    divergence: str = "jsd",
    *,
    teacher_tail_mass: Tensor | None = None,
    tail: TailMode = "bucket",
    sampled: bool = False,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> DistillationOutput:
    """``kd_weight * divergence + ce_weight * CE`` against a sparse (top-k) teacher.

    Args:
        student_logits: ``[..., V_s]`` student logits, any float dtype (computed in float32).
        teacher_topk_ids: ``[..., k]`` the teacher's top-k token ids per position, distinct.
        teacher_topk_logprobs: ``[..., k]`` their log-probabilities under the teacher's full softmax
            at temperature 1.
        labels: ``[...]`` next-token ids aligned with the logits, ``ignore_index`` where masked.
        divergence: as in :func:`distill.losses.distillation_loss`.
        teacher_tail_mass: optional ``[...]`` mass outside the top-k (derived when ``None``).
        tail: ``"bucket"`` or ``"renormalize"``; see the module docstring for the bias of each.
        sampled: the ids and log-probs are sampled targets (:func:`distill.formats.sampling.priority_sample`),
            an unbiased estimate of the teacher rather than its top-k: forward KL only, no tail.
        beta, alpha, temperature, kd_weight, ce_weight, reduction, vocab_size, ignore_index: as in
            :func:`distill.losses.distillation_loss`.

    Returns:
        :class:`DistillationOutput`; ``.loss`` is the differentiable objective.
    """
    objective = Objective.from_kwargs(
        divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
        vocab_size=resolve_vocab_size(student_logits.shape[-1], None, vocab_size), ignore_index=ignore_index,
    )  # fmt: skip
    leading_shape = student_logits.shape[:-1]
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])
    tail_mass = None if teacher_tail_mass is None else teacher_tail_mass.detach()
    targets = SparseTargets(teacher_topk_ids, teacher_topk_logprobs.detach(), tail_mass, estimate=sampled)
    labels_flat, rows, targets = prepare_sparse_targets(objective, targets, labels, student_flat.shape[0])
    if rows is not None:
        student_flat = student_flat[rows]
    per_token = objective.token_losses(student_flat, labels_flat, teacher_sparse=targets)
    return reduce_token_losses(per_token, objective, reduction, rows, leading_shape, labels is not None)


def prepare_sparse_targets(
    objective: Objective,
    targets: SparseTargets,
    labels: Tensor | None,
    num_rows: int,
) -> tuple[Tensor | None, Tensor | None, SparseTargets]:
    """Check sparse targets and keep only the positions that count.

    Args:
        objective: the loss settings, with ``vocab_size`` resolved.
        targets: targets with any leading shape matching the ``num_rows`` positions.
        labels: labels of those positions, or ``None``.
        num_rows: number of student positions.

    Returns:
        ``(labels [n], rows [n] or None, targets [n, k])`` restricted to unmasked positions; masked
        positions are never validated nor computed, so they may hold any padding.
    """
    if objective.tail == "bucket" and objective.temperature != 1.0:
        raise ValueError(
            "tail='bucket' needs temperature=1: the tempered teacher's mass outside its top-k is unknown. "
            "Use tail='renormalize' to distill at a temperature from top-k targets."
        )
    if targets.estimate:
        check_estimate_objective(objective)
    assert objective.vocab_size is not None
    targets = targets.flatten()
    if targets.estimate and targets.tail_mass is None:
        # Sampled weights stand for the whole distribution: nothing is left for the tail bucket.
        targets = SparseTargets(
            targets.topk_ids, targets.topk_logprobs, targets.topk_logprobs.new_zeros(num_rows), estimate=True
        )
    if targets.topk_ids.shape[0] != num_rows:
        raise ValueError(
            f"The teacher has targets for {targets.topk_ids.shape[0]} positions but the student has {num_rows}."
        )
    labels_flat = None
    if labels is not None:
        check_labels(labels, objective.vocab_size, objective.ignore_index)
        labels_flat = labels.reshape(-1)
    elif objective.ce_weight:
        raise ValueError("ce_weight > 0 needs labels: pass the next-token ids (ignore_index where masked).")
    rows = select_valid_rows(labels_flat, num_rows, objective.ignore_index)
    if rows is not None:
        assert labels_flat is not None
        labels_flat = labels_flat[rows]
        targets = targets.take(rows)
    check_sparse_targets(targets, targets.topk_ids.shape[0], objective.vocab_size)
    return labels_flat, rows, targets


def check_estimate_objective(objective: Objective) -> None:
    """Refuse an objective whose gradient sampled (estimated) teacher targets would bias.

    The forward KL's gradient with respect to the student's logits is ``q - p``: linear in the
    teacher's probabilities, so unbiased targets give an unbiased gradient. Every other divergence
    (JSD, reverse KL, skew KLs, TVD) is non-linear in ``p``, and renormalising over the sampled ids
    or tempering is too.
    """
    divergence = objective.divergence
    is_forward_kl = divergence.name == "forward_kl" or (divergence.name == "jsd" and divergence.beta == 0.0)
    if not is_forward_kl or objective.tail != "bucket" or objective.temperature != 1.0:
        raise ValueError(
            "Sampled teacher targets (an unbiased estimate of the teacher's distribution) keep the gradient unbiased "
            "only for the forward KL at temperature 1 with tail='bucket'; got divergence="
            f"{divergence.name!r} (beta={divergence.beta}), tail={objective.tail!r}, "
            f"temperature={objective.temperature}. "
            "Use loss='forward_kl', or a top-k cache for other divergences."
        )

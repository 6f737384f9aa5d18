"""Fused form: student hidden states and head in, loss out, with no ``[tokens x vocab]`` logits alive.

Tokens are processed in chunks. For each chunk the student's logits (and, for a dense teacher, the
teacher's) are computed, the per-token loss of :class:`distill.losses.objective.Objective` is
differentiated with respect to the chunk's student logits, and that gradient is immediately pushed
through the head matmuls into the gradients of the hidden states, head weight and bias. Only those
gradients survive the loop, so peak extra memory is ``O(chunk_size x vocab)`` instead of
``O(tokens x vocab)``, and the backward pass is a multiplication by the incoming scalar gradient.
Masked positions (``labels == ignore_index``, e.g. the prompt) are dropped before any logit is
computed, so they cost nothing.

The head weight's gradient is accumulated in float32 whatever the weight's dtype, so many bf16
chunks do not lose precision; it is cast to the weight's dtype at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.losses.objective import (
    DistillationOutput,
    Objective,
    Reduction,
    TailMode,
    check_finite,
    select_valid_rows,
    summarize,
    upcast,
)
from distill.losses.sparse import prepare_sparse_targets
from distill.losses.targets import SparseTargets, TeacherHead
from distill.losses.vocab import check_labels, resolve_vocab_size

__all__ = ["FusedDistillationLoss", "default_chunk_size", "fused_distillation_loss"]

# Elements of one [chunk x vocab] float32 buffer the default chunk size aims for. On a CPU small
# chunks stay in cache (measured fastest, see docs/losses.md); a GPU needs tall matmuls to be busy.
_TARGET_CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: one ``[chunk, vocab]`` float32 buffer of 16 MiB on a CPU, 256 MiB on a GPU.

    A multiple of 32 between 32 and 4096, e.g. 32 (CPU) / 416 (GPU) tokens at a 151,936 vocabulary.
    """
    target = _TARGET_CHUNK_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "cuda"]
    return max(32, min(4096, (target // vocab_size) // 32 * 32))


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias``: ``[c, H] x [V, H] -> [c, V]`` in the inputs' dtype."""
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-2-style final-logit soft-capping, ``cap * tanh(logits / cap)``; identity when ``cap`` is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


class _FusedDistillation(torch.autograd.Function):
    """Loss and its gradients in one chunked pass; backward only rescales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor | None,
        teacher: TeacherHead | SparseTargets,
        objective: Objective,
        student_softcap: float | None,
        chunk_size: int,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        vocab = objective.vocab_size
        assert vocab is not None
        weight_used = weight[:vocab]
        bias_used = None if bias is None else bias[:vocab]
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        accumulate_dtype = upcast(weight[:0]).dtype
        grad_weight = weight.new_zeros(vocab, weight.shape[1], dtype=accumulate_dtype) if needs_weight else None
        grad_bias = weight.new_zeros(vocab, dtype=accumulate_dtype) if needs_bias else None
        sums = hidden.new_zeros(5, dtype=accumulate_dtype)  # loss, kd, ce, agreement, teacher entropy

        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden_chunk = hidden[rows]
            raw_logits = upcast(_head_logits(hidden_chunk, weight_used, bias_used)).requires_grad_(True)
            teacher_logits, teacher_sparse = None, None
            if isinstance(teacher, TeacherHead):
                teacher_bias = None if teacher.bias is None else teacher.bias[:vocab]
                teacher_raw = _head_logits(teacher.hidden[rows], teacher.weight[:vocab], teacher_bias)
                teacher_logits = _softcap(teacher_raw, teacher.softcap)
            else:
                teacher_sparse = teacher.take(rows)
            with torch.enable_grad():
                student_logits = _softcap(raw_logits, student_softcap)
                per_token = objective.token_losses(
                    student_logits, None if labels is None else labels[rows], teacher_logits, teacher_sparse
                )
                chunk_loss = objective.kd_weight * per_token.kd.sum()
                if objective.ce_weight:
                    chunk_loss = chunk_loss + objective.ce_weight * per_token.ce.sum()
                (grad_logits,) = torch.autograd.grad(chunk_loss * scale, raw_logits)
            sums += torch.stack(
                [
                    chunk_loss.detach(),
                    per_token.kd.sum(),
                    per_token.ce.sum(),
                    per_token.agree.sum(),
                    per_token.teacher_entropy.sum(),
                ]
            )
            del student_logits, per_token, teacher_logits, raw_logits

            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight_used
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden_chunk.to(accumulate_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)

        ctx.save_for_backward(*_full_rows(grad_hidden, grad_weight, grad_bias, weight, bias))
        loss = sums[0] * scale
        ctx.mark_non_differentiable(sums)
        return loss, sums[1], sums[2], sums[3], sums[4]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *unused_metric_grads: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)  # type: ignore[attr-defined]
        return (*grads, None, None, None, None, None, None)


def _full_rows(
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients in the parameters' dtypes and full row counts (padding rows beyond the vocab get 0)."""

    def pad(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
        if grad is None or like is None:
            return None
        if grad.shape[0] == like.shape[0]:
            return grad.to(like.dtype)
        full = torch.zeros_like(like)
        full[: grad.shape[0]] = grad
        return full

    return grad_hidden, pad(grad_weight, weight), pad(grad_bias, bias)


def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: TeacherHead | SparseTargets,
    labels: Tensor | None = None,
    divergence: str = "jsd",
    *,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    tail: TailMode = "bucket",
    reduction: Reduction = "mean",
    vocab_size: int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> DistillationOutput:
    """The distillation loss from the student's final hidden states, chunked over tokens.

    Computes exactly what :func:`distill.losses.distillation_loss` (dense teacher) or
    :func:`distill.losses.sparse_distillation_loss` (sparse teacher) compute on the materialised
    logits, with peak extra memory ``O(chunk_size x vocab)``.

    Args:
        student_hidden: ``[..., H]`` the student's final hidden states (after its final norm), e.g.
            ``[batch, seq, H]``, any float dtype; head matmuls run in this dtype, softmax math in
            float32.
        student_weight: ``[V_s, H]`` the student's LM head weight (its embedding when tied).
        teacher: :class:`TeacherHead` (``hidden`` ``[..., H_t]`` for the same positions, head
            ``[V_t, H_t]``) or :class:`SparseTargets` (``[..., k]`` ids and log-probs).
        labels: ``[...]`` next-token ids aligned with the hidden states, ``ignore_index`` where
            masked, or ``None`` to use every position.
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tvd``.
        student_bias: optional ``[V_s]`` head bias.
        student_softcap: the student's final-logit soft-capping value, if its model has one.
        beta, alpha, temperature, kd_weight, ce_weight: as in :func:`distill.losses.distillation_loss`.
        tail: sparse teacher only; see :mod:`distill.losses.sparse`.
        reduction: ``mean`` over unmasked positions or ``sum`` (per-position values need the
            dense form).
        vocab_size: shared vocabulary range; required when the heads have different row counts.
        ignore_index: label value of masked positions.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` of the vocabulary and device.

    Returns:
        :class:`DistillationOutput`; ``.loss`` is differentiable with respect to ``student_hidden``,
        ``student_weight`` and ``student_bias``. Teacher tensors never receive gradients.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"The fused loss supports reduction='mean' or 'sum'; got {reduction!r}.")
    teacher_rows = teacher.weight.shape[0] if isinstance(teacher, TeacherHead) else None
    objective = Objective.from_kwargs(
        divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
        vocab_size=resolve_vocab_size(student_weight.shape[0], teacher_rows, vocab_size), ignore_index=ignore_index,
    )  # fmt: skip
    vocab = objective.vocab_size
    assert vocab is not None
    hidden_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    num_rows = hidden_flat.shape[0]
    if hidden_flat.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"Student hidden size {hidden_flat.shape[-1]} does not match its head weight "
            f"{tuple(student_weight.shape)}."
        )

    if isinstance(teacher, SparseTargets):
        labels_flat, rows, teacher = prepare_sparse_targets(objective, teacher, labels, num_rows)
    else:
        labels_flat, rows = _prepare_dense(objective, labels, num_rows)
        teacher = _select_teacher_rows(teacher, num_rows, rows)
    if rows is not None:
        hidden_flat = hidden_flat[rows]
    check_finite(hidden_flat, "Student hidden states")
    if isinstance(teacher, TeacherHead):
        check_finite(teacher.hidden, "Teacher hidden states")
    num_tokens = hidden_flat.shape[0]
    scale = 1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0
    loss, kd_sum, ce_sum, agree_sum, entropy_sum = _FusedDistillation.apply(
        hidden_flat, student_weight, student_bias, labels_flat, teacher, objective, student_softcap,
        chunk_size or default_chunk_size(vocab, hidden_flat.device), scale,
    )  # fmt: skip
    return summarize(loss, kd_sum, ce_sum, agree_sum, entropy_sum, num_tokens, labels is not None)


def _prepare_dense(objective: Objective, labels: Tensor | None, num_rows: int) -> tuple[Tensor | None, Tensor | None]:
    """Checked flat labels and the unmasked rows, for a dense teacher."""
    assert objective.vocab_size is not None
    if labels is None:
        if objective.ce_weight:
            raise ValueError("ce_weight > 0 needs labels: pass the next-token ids (ignore_index where masked).")
        return None, None
    check_labels(labels, objective.vocab_size, objective.ignore_index)
    labels_flat = labels.reshape(-1)
    rows = select_valid_rows(labels_flat, num_rows, objective.ignore_index)
    assert rows is not None
    return labels_flat[rows], rows


def _select_teacher_rows(teacher: TeacherHead, num_rows: int, rows: Tensor | None) -> TeacherHead:
    """The teacher head with its hidden states flattened, detached and restricted to ``rows``."""
    hidden = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
    if hidden.shape[0] != num_rows:
        raise ValueError(
            f"The teacher has hidden states for {hidden.shape[0]} positions but the student has {num_rows}."
        )
    if hidden.shape[-1] != teacher.weight.shape[1]:
        raise ValueError(
            f"Teacher hidden size {hidden.shape[-1]} does not match its head weight {tuple(teacher.weight.shape)}."
        )
    if rows is not None:
        hidden = hidden[rows]
    bias = None if teacher.bias is None else teacher.bias.detach()
    return TeacherHead(hidden, teacher.weight.detach(), bias, teacher.softcap)


class FusedDistillationLoss(nn.Module):
    """Module form of :func:`fused_distillation_loss`, holding the loss settings (validated here).

    Example::

        loss_fn = FusedDistillationLoss("jsd", beta=0.5, ce_weight=0.1)
        teacher = TeacherHead(teacher_hidden, teacher_model.lm_head.weight)
        out = loss_fn(student_hidden, student_model.lm_head.weight, teacher, labels)
        out.loss.backward()
    """

    def __init__(
        self,
        divergence: str = "jsd",
        *,
        beta: float = 0.5,
        alpha: float = 0.1,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        tail: TailMode = "bucket",
        reduction: Reduction = "mean",
        vocab_size: int | None = None,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        student_softcap: float | None = None,
    ) -> None:
        super().__init__()
        Objective.from_kwargs(divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight,
                              ce_weight=ce_weight, tail=tail, vocab_size=vocab_size)  # fmt: skip
        self.divergence = divergence
        self.settings = dict(
            beta=beta, alpha=alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
            reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index, chunk_size=chunk_size,
            student_softcap=student_softcap,
        )  # fmt: skip

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher: TeacherHead | SparseTargets,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
    ) -> DistillationOutput:
        """See :func:`fused_distillation_loss`."""
        return fused_distillation_loss(
            student_hidden, student_weight, teacher, labels, self.divergence, student_bias=student_bias,
            **self.settings,  # type: ignore[arg-type]
        )  # fmt: skip

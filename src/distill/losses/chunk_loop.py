"""The fused loss's chunk loop: head matmuls, a chunk body, and the gradients pushed through the head.

:func:`run_chunks` walks the unmasked tokens in chunks. For each it computes the student's logits (and
a dense teacher's) into reused buffers, runs the chunk body — the closed form of
:mod:`distill.losses.closed_form`, or autograd through :meth:`Objective.token_losses` as the reference —
and multiplies the logits' gradient into the gradients of the hidden states, head weight and bias.
:class:`FusedDistillationFunction` wraps it for autograd; its backward only scales what the forward
computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from distill.losses.closed_form import ChunkBuffers, closed_form_chunk
from distill.losses.objective import Objective, TokenLosses, upcast
from distill.losses.targets import OutputHead, SparseTargets, TeacherHead

__all__ = ["GRADIENTS", "ChunkSettings", "FusedDistillationFunction", "Gradient", "compiled_chunk", "run_chunks"]

Gradient = Literal["closed_form", "autograd"]
GRADIENTS: tuple[str, ...] = ("closed_form", "autograd")


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-2-style final-logit soft-capping, ``cap * tanh(logits / cap)``; identity when ``cap`` is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


@dataclass(frozen=True)
class ChunkSettings:
    """What every chunk needs besides its rows: the loss settings and how to compute the gradient."""

    objective: Objective
    student_softcap: float | None
    chunk_size: int
    scale: float
    gradient: Gradient
    compiled: bool = False  # the chunk body through torch.compile (see :func:`compiled_chunk`)


def run_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    teacher: TeacherHead | SparseTargets,
    settings: ChunkSettings,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop: sums of the metrics and, for the inputs in ``needs``, the loss's gradients.

    Args:
        hidden: ``[n, H]`` unmasked student hidden states; weight ``[V_s, H]``; bias ``[V_s]`` or None.
        labels: ``[n]`` or None; teacher: its targets for the same ``n`` rows.
        settings: see :class:`ChunkSettings`.
        needs: whether the gradients of (hidden, weight, bias) are wanted; all False means forward only:
            no gradient buffer, no backward matmul, no gradient math.

    Returns:
        ``([5] sums: weighted loss, kd, ce, agreement, teacher entropy; grad_hidden [n, H];
        grad_weight [V, H] float32; grad_bias [V] float32)``, gradients None where not wanted.
    """
    objective = settings.objective
    vocab = objective.vocab_size
    assert vocab is not None
    weight_used = weight[:vocab]
    # The student's raw logits: its soft-capping is part of the chunk body (differentiated there).
    student_head = OutputHead(weight, bias)
    teacher_head = teacher.head if isinstance(teacher, TeacherHead) else None
    needs_hidden, needs_weight, needs_bias = needs
    need_grad = any(needs)
    compute_dtype = upcast(weight[:0]).dtype
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    grad_weight = weight.new_zeros(vocab, weight.shape[1], dtype=compute_dtype) if needs_weight else None
    grad_bias = weight.new_zeros(vocab, dtype=compute_dtype) if needs_bias else None
    sums = hidden.new_zeros(5, dtype=compute_dtype)  # loss, kd, ce, agreement, teacher entropy
    buffers = ChunkBuffers(vocab, compute_dtype, hidden.device)

    for start in range(0, hidden.shape[0], settings.chunk_size):
        rows = slice(start, start + settings.chunk_size)
        hidden_chunk = hidden[rows]
        count = hidden_chunk.shape[0]
        labels_chunk = None if labels is None else labels[rows]
        teacher_logits, teacher_sparse = None, None
        if teacher_head is not None:
            teacher_logits = teacher_head.logits(teacher.hidden[rows], vocab, out=buffers.get("teacher", count))
        else:
            teacher_sparse = teacher.take(rows)
        student_logits = student_head.logits(hidden_chunk, vocab, out=buffers.get("student", count))
        if settings.compiled:
            per_token, grad_logits = compiled_chunk(
                objective, student_logits, labels_chunk, teacher_logits, teacher_sparse, settings, need_grad
            )
        elif settings.gradient == "autograd":
            per_token, grad_logits = _autograd_chunk(
                objective, student_logits, labels_chunk, teacher_logits, teacher_sparse, settings, need_grad
            )
        else:
            per_token, grad_logits = closed_form_chunk(
                objective, student_logits, labels_chunk, teacher_logits, teacher_sparse,
                settings.student_softcap, settings.scale if need_grad else None, buffers,
            )  # fmt: skip
        chunk_loss = objective.kd_weight * per_token.kd.sum()
        if objective.ce_weight:
            chunk_loss = chunk_loss + objective.ce_weight * per_token.ce.sum()
        metrics = (per_token.kd, per_token.ce, per_token.agree, per_token.teacher_entropy)
        sums += torch.stack([chunk_loss, *(values.sum() for values in metrics)])
        if grad_logits is None:
            continue
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight_used
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), hidden_chunk.to(compute_dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    return sums, grad_hidden, grad_weight, grad_bias


def _autograd_chunk(
    objective: Objective,
    student_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_sparse: SparseTargets | None,
    settings: ChunkSettings,
    need_grad: bool,
) -> tuple[TokenLosses, Tensor | None]:
    """The reference chunk body: :meth:`Objective.token_losses` differentiated by autograd."""
    raw_logits = student_logits.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        chunk_loss, per_token = _chunk_objective(
            raw_logits, labels, teacher_logits, teacher_sparse, objective, settings.student_softcap, settings.scale
        )
        if not need_grad:
            return per_token, None
        (grad_logits,) = torch.autograd.grad(chunk_loss, raw_logits)
    return per_token, grad_logits


def _chunk_objective(
    raw_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_sparse: SparseTargets | None,
    objective: Objective,
    student_softcap: float | None,
    scale: float,
) -> tuple[Tensor, TokenLosses]:
    """A chunk's scaled weighted loss and its per-token values: what the compiled body differentiates."""
    per_token = objective.token_losses(_softcap(raw_logits, student_softcap), labels, teacher_logits, teacher_sparse)
    chunk_loss = objective.kd_weight * per_token.kd.sum()
    if objective.ce_weight:
        chunk_loss = chunk_loss + objective.ce_weight * per_token.ce.sum()
    return chunk_loss * scale, TokenLosses(*(value.detach() for value in per_token))


@functools.cache
def _compiled_bodies() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The compiled chunk bodies, built on first use: (values and gradient, values only)."""
    with_grad = torch.func.grad_and_value(_chunk_objective, has_aux=True)
    return torch.compile(with_grad, dynamic=True), torch.compile(_chunk_objective, dynamic=True)


def compiled_chunk(
    objective: Objective,
    student_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_sparse: SparseTargets | None,
    settings: ChunkSettings,
    need_grad: bool,
) -> tuple[TokenLosses, Tensor | None]:
    """The chunk body as one ``torch.compile``d function (``compiled=True``), as Liger's chunked losses do.

    :meth:`Objective.token_losses` and its gradient (``torch.func.grad_and_value``) compiled together, so
    the compiler fuses the elementwise passes; one compilation per objective and input kind (dynamic
    shapes cover the shorter last chunk). The first call compiles (tens of seconds, and a C++ compiler on
    a CPU). Returns the values and the gradient w.r.t. the raw logits, as :func:`closed_form_chunk`.
    """
    with_grad, values_only = _compiled_bodies()
    inputs = (student_logits, labels, teacher_logits, teacher_sparse, objective, settings.student_softcap)
    if not need_grad:
        _, per_token = values_only(*inputs, settings.scale)
        return per_token, None
    with torch.enable_grad():
        grad_logits, (_, per_token) = with_grad(*inputs, settings.scale)
    return per_token, grad_logits


class FusedDistillationFunction(torch.autograd.Function):
    """Loss and its gradients in one chunked pass; backward only rescales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor | None,
        teacher: TeacherHead | SparseTargets,
        settings: ChunkSettings,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        needs = tuple(ctx.needs_input_grad[:3])
        sums, grad_hidden, grad_weight, grad_bias = run_chunks(hidden, weight, bias, labels, teacher, settings, needs)
        # The gradients are intermediates this Function owns (attributes, not saved tensors): backward
        # scales them in place and hands them over, so autograd takes them without a second [V, H] copy.
        # The inputs are saved only so that a second backward through a retained graph can recompute them.
        ctx.grads = _full_rows(grad_hidden, grad_weight, grad_bias, weight, bias)  # type: ignore[attr-defined]
        ctx.save_for_backward(hidden, weight, bias)
        ctx.recompute = (labels, teacher, settings, needs)  # type: ignore[attr-defined]
        loss = sums[0] * settings.scale
        ctx.mark_non_differentiable(sums)
        return loss, sums[1], sums[2], sums[3], sums[4]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *unused_metric_grads: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None  # type: ignore[attr-defined]
        hidden, weight, bias = ctx.saved_tensors  # type: ignore[attr-defined]
        if grads is None:  # a second backward (retain_graph=True, e.g. gradcheck): the chunk loop again
            labels, teacher, settings, needs = ctx.recompute  # type: ignore[attr-defined]
            _, *recomputed = run_chunks(hidden, weight, bias, labels, teacher, settings, needs)
            grads = _full_rows(*recomputed, weight, bias)
        scaled = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return (*scaled, None, None, None)


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

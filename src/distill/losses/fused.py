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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from distill.losses.closed_form import ChunkBuffers, closed_form_chunk
from distill.losses.objective import (
    DistillationOutput,
    Objective,
    Reduction,
    TailMode,
    TokenLosses,
    check_finite,
    select_valid_rows,
    summarize,
    upcast,
)
from distill.losses.sparse import prepare_sparse_targets
from distill.losses.targets import SparseTargets, TeacherHead
from distill.losses.vocab import check_labels, resolve_vocab_size

__all__ = ["GRADIENTS", "FusedDistillationLoss", "Gradient", "default_chunk_size", "fused_distillation_loss"]

# Elements of one [chunk x vocab] float32 buffer the default chunk size aims for; the closed-form body
# keeps 4 of them (dense teacher). The head matmuls, ~80% of the time, need tall chunks: on a CPU
# (measured, 1 thread, V = 151,936, H = 576) they run ~1.45x slower per FLOP at 32 rows than at 128,
# while the elementwise passes stream from memory at any chunk size (a [32 x V] buffer is already
# 18.5 MiB, past the L2 cache). 64 MiB gives 96 rows there (~4% slower than 128 in a whole step), so that
# 4 buffers plus the head gradient stay under the peak of the autograd body (~14 buffers) at its old
# default of 32 rows. A GPU gets 512 MiB (864 rows at V = 151,936, 1,024 at 128,256: Liger's chunk).
_TARGET_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: one ``[chunk, vocab]`` float32 buffer of 64 MiB on a CPU, 512 MiB on a GPU.

    A multiple of 32 between 32 and 4096, e.g. 96 (CPU) / 864 (GPU) tokens at a 151,936 vocabulary.
    """
    target = _TARGET_CHUNK_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "cuda"]
    return max(32, min(4096, (target // vocab_size) // 32 * 32))


def _head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``hidden @ weight.T + bias``: ``[c, H] x [V, H] -> [c, V]``, the matmul in the inputs' dtype.

    Written into ``out`` (a float32 or float64 buffer) directly when the inputs have its dtype, else
    computed in theirs (e.g. bf16) and upcast into it.
    """
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias.to(out.dtype), hidden, weight.t(), out=out)
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return out.copy_(logits)


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma-2-style final-logit soft-capping, ``cap * tanh(logits / cap)``; identity when ``cap`` is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _softcap_in_place(logits: Tensor, cap: float | None) -> None:
    """:func:`_softcap` in place (the teacher's logits need no gradient)."""
    if cap is not None:
        logits.div_(cap).tanh_().mul_(cap)


Gradient = Literal["closed_form", "autograd"]
GRADIENTS: tuple[str, ...] = ("closed_form", "autograd")


@dataclass(frozen=True)
class _ChunkSettings:
    """What every chunk needs besides its rows: the loss settings and how to compute the gradient."""

    objective: Objective
    student_softcap: float | None
    chunk_size: int
    scale: float
    gradient: Gradient


def _run_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor | None,
    teacher: TeacherHead | SparseTargets,
    settings: _ChunkSettings,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop: sums of the metrics and, for the inputs in ``needs``, the loss's gradients.

    Args:
        hidden: ``[n, H]`` unmasked student hidden states; weight ``[V_s, H]``; bias ``[V_s]`` or None.
        labels: ``[n]`` or None; teacher: its targets for the same ``n`` rows.
        settings: see :class:`_ChunkSettings`.
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
    bias_used = None if bias is None else bias[:vocab]
    needs_hidden, needs_weight, needs_bias = needs
    need_grad = any(needs)
    compute_dtype = upcast(weight[:0]).dtype
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    grad_weight = weight.new_zeros(vocab, weight.shape[1], dtype=compute_dtype) if needs_weight else None
    grad_bias = weight.new_zeros(vocab, dtype=compute_dtype) if needs_bias else None
    sums = hidden.new_zeros(5, dtype=compute_dtype)  # loss, kd, ce, agreement, teacher entropy
    rows_per_chunk = min(settings.chunk_size, max(hidden.shape[0], 1))
    buffers = ChunkBuffers(rows_per_chunk, vocab, compute_dtype, hidden.device)

    for start in range(0, hidden.shape[0], settings.chunk_size):
        rows = slice(start, start + settings.chunk_size)
        hidden_chunk = hidden[rows]
        count = hidden_chunk.shape[0]
        labels_chunk = None if labels is None else labels[rows]
        teacher_logits, teacher_sparse = None, None
        if isinstance(teacher, TeacherHead):
            teacher_bias = None if teacher.bias is None else teacher.bias[:vocab]
            teacher_out = buffers.get("teacher", count)
            teacher_logits = _head_logits(teacher.hidden[rows], teacher.weight[:vocab], teacher_bias, teacher_out)
            _softcap_in_place(teacher_logits, teacher.softcap)
        else:
            teacher_sparse = teacher.take(rows)
        student_logits = _head_logits(hidden_chunk, weight_used, bias_used, buffers.get("student", count))
        if settings.gradient == "autograd":
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
    settings: _ChunkSettings,
    need_grad: bool,
) -> tuple[TokenLosses, Tensor | None]:
    """The reference chunk body: :meth:`Objective.token_losses` differentiated by autograd."""
    raw_logits = student_logits.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        capped = _softcap(raw_logits, settings.student_softcap)
        per_token = objective.token_losses(capped, labels, teacher_logits, teacher_sparse)
        if not need_grad:
            return per_token, None
        chunk_loss = objective.kd_weight * per_token.kd.sum()
        if objective.ce_weight:
            chunk_loss = chunk_loss + objective.ce_weight * per_token.ce.sum()
        (grad_logits,) = torch.autograd.grad(chunk_loss * settings.scale, raw_logits)
    detached = TokenLosses(*(value.detach() for value in per_token))
    return detached, grad_logits


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
        settings: _ChunkSettings,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        needs = tuple(ctx.needs_input_grad[:3])
        sums, grad_hidden, grad_weight, grad_bias = _run_chunks(hidden, weight, bias, labels, teacher, settings, needs)
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
            _, *recomputed = _run_chunks(hidden, weight, bias, labels, teacher, settings, needs)
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
    gradient: Gradient = "closed_form",
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
        gradient: how each chunk's ``dLoss / d(logits)`` is computed: ``"closed_form"`` (default; the
            formulas beside each divergence, in place, 2-4 ``[chunk, V]`` float32 buffers) or
            ``"autograd"`` (the reference: autograd through :meth:`Objective.token_losses`, ~14 buffers).

    Returns:
        :class:`DistillationOutput`; ``.loss`` is differentiable with respect to ``student_hidden``,
        ``student_weight`` and ``student_bias``. Teacher tensors never receive gradients. Under
        ``torch.no_grad()`` only the forward runs: no gradient is computed or allocated.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"The fused loss supports reduction='mean' or 'sum'; got {reduction!r}.")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}; got {gradient!r}.")
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
    settings = _ChunkSettings(
        objective, student_softcap, chunk_size or default_chunk_size(vocab, hidden_flat.device),
        1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0, gradient,
    )  # fmt: skip
    differentiable = [t for t in (hidden_flat, student_weight, student_bias) if t is not None]
    with _matmul_precision(student_hidden):
        if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
            inputs = (hidden_flat, student_weight, student_bias, labels_flat, teacher, settings)
            outputs = _FusedDistillation.apply(*inputs)
        else:
            # Evaluation (no_grad / inference_mode) or nothing to train: the forward alone, no gradient work.
            sums, *_ = _run_chunks(
                hidden_flat, student_weight, student_bias, labels_flat, teacher, settings, (False, False, False)
            )
            outputs = (sums[0] * settings.scale, *sums[1:])
    loss, kd_sum, ce_sum, agree_sum, entropy_sum = outputs
    return summarize(loss, kd_sum, ce_sum, agree_sum, entropy_sum, num_tokens, labels is not None)


@contextmanager
def _matmul_precision(student_hidden: Tensor) -> Iterator[None]:
    """On CUDA with 16-bit hidden states, let the loss's float32 matmuls use TF32 (restored on exit).

    The head gradient ``grad_logits^T @ hidden`` accumulates in float32, and with a float32 head (a
    QLoRA student's ``lm_head``) the forward matmuls are float32 too; their inputs carry bf16/fp16
    precision already, so TF32's 10-bit mantissa loses nothing that was there, and tensor cores run them
    several times faster. CPU arithmetic (and float32 hidden states anywhere) is left exact.
    """
    if student_hidden.device.type != "cuda" or student_hidden.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


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
        gradient: Gradient = "closed_form",
    ) -> None:
        super().__init__()
        Objective.from_kwargs(divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight,
                              ce_weight=ce_weight, tail=tail, vocab_size=vocab_size)  # fmt: skip
        self.divergence = divergence
        self.settings = dict(
            beta=beta, alpha=alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
            reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index, chunk_size=chunk_size,
            student_softcap=student_softcap, gradient=gradient,
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

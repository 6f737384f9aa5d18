"""Fused form: student hidden states and head in, loss out, with no ``[tokens x vocab]`` logits alive.

Tokens are processed in chunks (:mod:`distill.losses.chunk_loop`). For each chunk the student's logits
(and, for a dense teacher, the teacher's) are computed, the per-token loss of
:class:`distill.losses.objective.Objective` is differentiated with respect to the chunk's student
logits (in closed form, :mod:`distill.losses.closed_form`, or by autograd as the reference), and that
gradient is immediately pushed through the head matmuls into the gradients of the hidden states, head
weight and bias. Only those
gradients survive the loop, so peak extra memory is ``O(chunk_size x vocab)`` instead of
``O(tokens x vocab)``, and the backward pass is a multiplication by the incoming scalar gradient.
Masked positions (``labels == ignore_index``, e.g. the prompt) are dropped before any logit is
computed, so they cost nothing.

The head weight's gradient is accumulated in float32 whatever the weight's dtype, so many bf16
chunks do not lose precision; it is cast to the weight's dtype at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from distill.losses.chunk_loop import GRADIENTS, ChunkSettings, FusedDistillationFunction, Gradient, run_chunks
from distill.losses.objective import (
    DistillationOutput,
    Objective,
    Reduction,
    TailMode,
    check_finite,
    select_valid_rows,
    summarize,
)
from distill.losses.sparse import prepare_sparse_targets
from distill.losses.targets import OutputHead, SparseTargets, TeacherHead, as_output_head
from distill.losses.vocab import check_labels, resolve_vocab_size

__all__ = [
    "GRADIENTS",
    "FusedDistillationLoss",
    "Gradient",
    "default_chunk_size",
    "default_compiled",
    "fused_distillation_loss",
    "fused_objective_loss",
    "uses_tf32",
]

# Elements of one [chunk x vocab] float32 buffer the default chunk size aims for. The head matmuls, ~80%
# of the time, want tall chunks: on a CPU (measured in CPU time, 1 thread, V = 151,936, H = 576/960) the
# four head GEMMs ran 1.15x faster per row at 192 rows than at 96 (and ~1.45x slower at 32 than at 128).
# On a CPU the closed-form body keeps 2 chunk-sized buffers (its scratch is block-sized, see
# closed_form.block_rows), so 128 MiB (192 rows at V = 151,936) holds the same memory as the previous 4
# buffers of 96 rows. A GPU takes each chunk in one block (4 buffers) and gets 512 MiB (864 rows at
# V = 151,936, 1,024 at 128,256: Liger's chunk).
_TARGET_CHUNK_ELEMENTS = {"cpu": 2**25, "cuda": 2**27}


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk: one ``[chunk, vocab]`` float32 buffer of 128 MiB on a CPU, 512 MiB on a GPU.

    A multiple of 32 between 32 and 4096, e.g. 192 (CPU) / 864 (GPU) tokens at a 151,936 vocabulary.
    """
    target = _TARGET_CHUNK_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "cuda"]
    return max(32, min(4096, (target // vocab_size) // 32 * 32))


def default_compiled(device: torch.device | str = "cpu") -> bool:
    """Whether the fused loss compiles its chunk body by default on ``device``: currently never.

    CPU: measured slower than the closed-form body (see ``docs/losses.md``). GPU: not yet measured, so
    off until a measurement shows it faster.
    """
    return _COMPILED_BY_DEFAULT["cpu" if torch.device(device).type == "cpu" else "cuda"]


_COMPILED_BY_DEFAULT = {"cpu": False, "cuda": False}


def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor | OutputHead,
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
    compiled: bool | None = None,
    tf32: bool | None = None,
) -> DistillationOutput:
    """The distillation loss from the student's final hidden states, chunked over tokens.

    Computes exactly what :func:`distill.losses.distillation_loss` (dense teacher) or
    :func:`distill.losses.sparse_distillation_loss` (sparse teacher) compute on the materialised
    logits, with peak extra memory ``O(chunk_size x vocab)``.

    Args:
        student_hidden: ``[..., H]`` the student's final hidden states (after its final norm), e.g.
            ``[batch, seq, H]``, any float dtype; head matmuls run in this dtype, softmax math in
            float32.
        student_weight: ``[V_s, H]`` the student's LM head weight (its embedding when tied), or its whole head
            as an :class:`OutputHead` (weight, bias, soft-cap; then ``student_bias`` and ``student_softcap``
            stay ``None``).
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
        compiled: run the chunk body through ``torch.compile`` (the objective and its autograd gradient
            compiled together, as Liger's chunked losses do; the first call compiles, and on a CPU needs a
            C++ compiler). ``None`` (default) is :func:`default_compiled`: off on a CPU, where it measured
            slower than the closed form, and off on a GPU until measured there. Overrides ``gradient``.
        tf32: CUDA only: let the loss's float32 matmuls use TF32 (scoped to the call). ``None`` (default):
            when the hidden states are 16-bit or CUDA autocast is on; pass ``True`` for a QLoRA student
            trained in bf16 (see :func:`uses_tf32`).

    Returns:
        :class:`DistillationOutput`; ``.loss`` is differentiable with respect to ``student_hidden``,
        ``student_weight`` and ``student_bias``. Teacher tensors never receive gradients. Under
        ``torch.no_grad()`` only the forward runs: no gradient is computed or allocated.
    """
    _check_modes(reduction, gradient)
    head = as_output_head(student_weight, student_bias, student_softcap)
    objective = Objective.from_kwargs(
        divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
        vocab_size=resolve_vocab_size(head.weight.shape[0], _teacher_rows(teacher), vocab_size),
        ignore_index=ignore_index,
    )  # fmt: skip
    return fused_objective_loss(
        student_hidden, head, teacher, labels, objective, reduction=reduction, chunk_size=chunk_size,
        gradient=gradient, compiled=compiled, tf32=tf32,
    )  # fmt: skip


def fused_objective_loss(
    student_hidden: Tensor,
    student_head: OutputHead | Tensor,
    teacher: TeacherHead | SparseTargets,
    labels: Tensor | None,
    objective: Objective,
    *,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    gradient: Gradient = "closed_form",
    compiled: bool | None = None,
    tf32: bool | None = None,
) -> DistillationOutput:
    """:func:`fused_distillation_loss` for an :class:`Objective` built once (the trainer's), not from keywords.

    Internal entry point: the trainer holds its loss settings as one checked :class:`Objective` and hands it
    over as is, with the student's head as one :class:`OutputHead` (``[V_s, H]`` weight, bias, soft-cap; its
    weight and bias receive gradients) -- or, as in :func:`fused_distillation_loss`, its weight with
    ``student_bias`` / ``student_softcap`` beside it. ``objective.vocab_size`` is checked against both heads here
    (``None``: all rows, which must then be equal). Arguments and return value otherwise as
    :func:`fused_distillation_loss`.
    """
    _check_modes(reduction, gradient)
    student_head = as_output_head(student_head, student_bias, student_softcap)
    student_weight, student_bias = student_head.weight, student_head.bias
    vocab = resolve_vocab_size(student_weight.shape[0], _teacher_rows(teacher), objective.vocab_size)
    if vocab != objective.vocab_size:
        objective = dataclasses.replace(objective, vocab_size=vocab)
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
    settings = ChunkSettings(
        objective, student_head.softcap, chunk_size or default_chunk_size(vocab, hidden_flat.device),
        1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0, gradient,
        default_compiled(hidden_flat.device) if compiled is None else compiled,
    )  # fmt: skip
    differentiable = [t for t in (hidden_flat, student_weight, student_bias) if t is not None]
    with _matmul_precision(uses_tf32(hidden_flat.device.type, hidden_flat.dtype, tf32)):
        if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
            inputs = (hidden_flat, student_weight, student_bias, labels_flat, teacher, settings)
            outputs = FusedDistillationFunction.apply(*inputs)
        else:
            # Evaluation (no_grad / inference_mode) or nothing to train: the forward alone, no gradient work.
            sums, *_ = run_chunks(
                hidden_flat, student_weight, student_bias, labels_flat, teacher, settings, (False, False, False)
            )
            outputs = (sums[0] * settings.scale, *sums[1:])
    loss, kd_sum, ce_sum, agree_sum, entropy_sum = outputs
    return summarize(loss, kd_sum, ce_sum, agree_sum, entropy_sum, num_tokens, labels is not None)


def _check_modes(reduction: str, gradient: str) -> None:
    """Refuse a reduction or gradient mode the fused form does not have."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"The fused loss supports reduction='mean' or 'sum'; got {reduction!r}.")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}; got {gradient!r}.")


def _teacher_rows(teacher: TeacherHead | SparseTargets) -> int | None:
    """Rows of a dense teacher's head; ``None`` for sparse targets (their ids are checked against the range)."""
    return teacher.weight.shape[0] if isinstance(teacher, TeacherHead) else None


def uses_tf32(device_type: str, hidden_dtype: torch.dtype, tf32: bool | None) -> bool:
    """Whether the loss lets its float32 matmuls use TF32: only on CUDA, where ``tf32`` (None: automatic) says.

    Automatic: on when the hidden states are 16-bit or CUDA autocast is on, i.e. when the model already
    runs at 16-bit precision. The float32 matmuls are the head gradient ``grad_logits^T @ hidden``
    (accumulated in float32 over chunks) and, with a float32 head, the forward ones; their inputs then
    carry 16-bit precision, so TF32's 10-bit mantissa loses little, and tensor cores run them several
    times faster. A QLoRA student (peft keeps its ``lm_head`` and final norm in float32, so its hidden
    states arrive in float32 outside autocast) needs ``tf32=True`` to get this. CPU arithmetic is exact.
    """
    if device_type != "cuda" or tf32 is False:
        return False
    return bool(tf32) or hidden_dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")


@contextmanager
def _matmul_precision(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA float32 matmuls inside the block when ``enabled``, the previous setting restored on exit.

    Through ``torch.backends.cuda.matmul.fp32_precision`` where torch has it: reading the legacy
    ``allow_tf32`` raises once a user has set the new one.
    """
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


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
        compiled: bool | None = None,
        tf32: bool | None = None,
    ) -> None:
        super().__init__()
        Objective.from_kwargs(divergence, beta, alpha, temperature=temperature, kd_weight=kd_weight,
                              ce_weight=ce_weight, tail=tail, vocab_size=vocab_size)  # fmt: skip
        self.divergence = divergence
        self.settings = dict(
            beta=beta, alpha=alpha, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, tail=tail,
            reduction=reduction, vocab_size=vocab_size, ignore_index=ignore_index, chunk_size=chunk_size,
            student_softcap=student_softcap, gradient=gradient, compiled=compiled, tf32=tf32,
        )  # fmt: skip

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor | OutputHead,
        teacher: TeacherHead | SparseTargets,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
    ) -> DistillationOutput:
        """See :func:`fused_distillation_loss`."""
        return fused_distillation_loss(
            student_hidden, student_weight, teacher, labels, self.divergence, student_bias=student_bias,
            **self.settings,  # type: ignore[arg-type]
        )  # fmt: skip

"""The fused loss's chunk body with closed-form gradients: values and ``dLoss / d(logits)`` without autograd.

For one chunk of ``n`` tokens it takes the student's raw logits (the head matmul's output, before
soft-capping) and the teacher's targets, and returns the per-token values of
:meth:`distill.losses.objective.Objective.token_losses` plus the gradient of the chunk's weighted loss
with respect to those raw logits. The divergence's own gradient, ``g = dD / d(log q)`` on its support,
comes from :meth:`distill.losses.divergences.Divergence.value_and_grad`; this module applies the chain
rule through everything between the logits and that support:

* the student's log-softmax: ``g - q * sum(g)`` (``q`` the student's tempered probabilities);
* a sparse teacher's support: the top-k entries map back to their ids; the tail bucket's log-mass is a
  log-sum-exp over the other tokens, so its gradient spreads over them as ``q_v / q_tail``; a
  renormalised top-k is a second log-softmax over the gathered ids;
* temperature (``1 / T``), the CE term at ``T = 1`` (``softmax(z) - onehot(label)``), and soft-capping
  (``1 - tanh^2``).

Memory: every ``[n, V]`` tensor is a :class:`ChunkBuffers` buffer reused across chunks and computed in
place, and the gradient is written over the student's logits. The elementwise work runs in row blocks
(:func:`block_rows`): on a CPU blocks of a few rows, so only the student's and a dense teacher's logits
are chunk-sized and the scratch (student and teacher log-probabilities; soft-capping's slope and a CE
term at ``T != 1`` add one each) is block-sized; on a GPU one block per chunk, i.e. four chunk-sized
buffers for a dense teacher, two for a sparse one. The autograd body (``gradient="autograd"``) keeps
about fourteen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.losses.divergences import row_sum_of_product
from distill.losses.objective import Objective, TokenLosses, upcast
from distill.losses.targets import SparseTargets

__all__ = ["CPU_BLOCK_ELEMENTS", "ChunkBuffers", "block_rows", "closed_form_chunk"]


class ChunkBuffers:
    """Named ``[rows, V]`` buffers allocated once and reused by every chunk (the last may be shorter).

    Each buffer is allocated at the size first asked for (the first chunk, or the first row block,
    is the largest) and grown if a later request is larger. Reusing them avoids an allocation, and
    on a CPU fresh zeroed pages, per buffer and chunk.
    """

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        """The first ``rows`` rows of buffer ``name`` (contents undefined)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.empty(rows, self.vocab, dtype=self.dtype, device=self.device)
        return buffer[:rows]

    @property
    def count(self) -> int:
        """How many buffers exist so far."""
        return len(self._buffers)


def block_rows(rows: int, vocab: int, device: torch.device) -> int:
    """Rows of the blocks a chunk's elementwise work runs in: a few on a CPU, the whole chunk on a GPU.

    The head matmuls want tall chunks; the elementwise work does not, and in blocks its scratch tensors
    (log-probabilities, the mixture) are block-sized instead of chunk-sized, so a chunk needs only two
    ``[chunk, V]`` buffers (the student's logits, which become the gradient, and the teacher's). A GPU
    pays a kernel launch per op and block, so it takes the chunk in one block.
    """
    if device.type != "cpu":
        return max(rows, 1)
    return max(1, min(rows, CPU_BLOCK_ELEMENTS // max(vocab, 1)))


# Elements of one block buffer on a CPU (4 MiB of float32): 6 rows at V = 151,936, so the tensors one
# block touches (~24 MiB) fit a 32 MiB L3 cache between passes. Measured in CPU time (1 thread, V =
# 151,936, 96-row chunks, under load): the body costs about the same (~11 ns per element) in blocks of
# 1 to 27 rows as in one block; the gain is memory (two chunk-sized buffers instead of four).
CPU_BLOCK_ELEMENTS = 2**20


def _softcap_(logits: Tensor, cap: float | None, slope: Tensor | None) -> None:
    """``logits = cap * tanh(logits / cap)`` in place; writes ``d capped / d raw = 1 - tanh^2`` into ``slope``."""
    if cap is None:
        return
    logits.div_(cap).tanh_()
    if slope is not None:
        torch.mul(logits, logits, out=slope).neg_().add_(1.0)
    logits.mul_(cap)


def _log_softmax_and_probs(logits: Tensor, temperature: float, logprobs_out: Tensor) -> tuple[Tensor, Tensor]:
    """``log_softmax(logits / T)`` into ``logprobs_out`` and its exponential into ``logits``' storage."""
    if temperature != 1.0:
        logits.div_(temperature)
    logprobs = torch.log_softmax(logits, dim=-1, out=logprobs_out)
    return logprobs, torch.exp(logprobs, out=logits)


def closed_form_chunk(
    objective: Objective,
    raw_logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_sparse: SparseTargets | None,
    student_softcap: float | None,
    grad_scale: float | None,
    buffers: ChunkBuffers,
) -> tuple[TokenLosses, Tensor | None]:
    """Per-token values of one chunk and the gradient of its weighted loss w.r.t. the raw student logits.

    The chunk is processed in row blocks (:func:`block_rows`); each writes its gradient over its rows of
    ``raw_logits``.

    Args:
        objective: the loss settings, ``vocab_size`` resolved.
        raw_logits: ``[n, V]`` the student head's output in the compute dtype (a ``buffers`` buffer named
            ``"student"``); overwritten by the gradient (or by scratch values when ``grad_scale`` is None).
        labels: ``[n]`` label ids (``ignore_index`` where none) or ``None``.
        teacher_logits: ``[n, V]`` the dense teacher's logits after its soft-capping (buffer
            ``"teacher"``; consumed), or ``None``.
        teacher_sparse: the sparse teacher's targets for these rows, or ``None``.
        student_softcap: the student's final-logit soft-capping value, or ``None``.
        grad_scale: multiplies the gradient of ``sum(kd_weight * kd + ce_weight * ce)``; ``None``
            skips all gradient work (evaluation).
        buffers: where every ``[rows, V]`` tensor lives.

    Returns:
        (:class:`TokenLosses` with ``[n]`` tensors, the ``[n, V]`` gradient (``raw_logits``) or ``None``).
    """
    rows = raw_logits.shape[0]
    step = block_rows(rows, raw_logits.shape[1], raw_logits.device)
    parts = []
    for start in range(0, max(rows, 1), step):  # an empty chunk is one empty block
        block = slice(start, start + step)
        parts.append(
            _block(
                objective,
                raw_logits[block],
                None if labels is None else labels[block],
                None if teacher_logits is None else teacher_logits[block],
                None if teacher_sparse is None else teacher_sparse.take(block),
                student_softcap,
                grad_scale,
                buffers,
            )  # fmt: skip
        )
    per_token = (
        parts[0] if len(parts) == 1 else TokenLosses(*(torch.cat(values) for values in zip(*parts, strict=True)))
    )
    return per_token, None if grad_scale is None else raw_logits


def _block(
    objective: Objective,
    logits: Tensor,
    labels: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_sparse: SparseTargets | None,
    student_softcap: float | None,
    grad_scale: float | None,
    buffers: ChunkBuffers,
) -> TokenLosses:
    """One row block of :func:`closed_form_chunk`: its values, and its gradient written over ``logits``."""
    rows = logits.shape[0]
    temperature = objective.temperature
    need_grad = grad_scale is not None
    slope = buffers.get("softcap_slope", rows) if need_grad and student_softcap is not None else None
    _softcap_(logits, student_softcap, slope)
    student_top1 = logits.argmax(-1)

    has_label = None if labels is None else labels != objective.ignore_index
    safe_labels = None if labels is None else torch.where(has_label, labels, torch.zeros_like(labels))[:, None]
    ce_probs, ce = None, None
    if safe_labels is not None and temperature != 1.0:
        ce_probs, ce = _untempered_ce(logits, safe_labels, buffers.get("ce_probs", rows))

    if teacher_sparse is not None and objective.tail == "renormalize":
        student_topk_tempered = logits.gather(-1, teacher_sparse.topk_ids) / temperature
    student_logprobs, student_probs = _log_softmax_and_probs(
        logits, temperature, buffers.get("student_logprobs", rows)
    )  # student_probs is logits' storage from here on
    if safe_labels is not None and ce is None:
        ce = -student_logprobs.gather(-1, safe_labels).squeeze(-1)

    # The gradient is kd_scale * dKD/d(z/T) + ce_coef * (softmax(z) - onehot(label)); every path below
    # writes it over student_probs, folding ce_coef * q into its last pass when the CE's softmax is q (T = 1).
    kd_scale = objective.kd_weight * grad_scale / temperature if need_grad else 1.0
    ce_coef = None
    if need_grad and objective.ce_weight and safe_labels is not None:
        assert has_label is not None
        ce_coef = (objective.ce_weight * grad_scale) * has_label.to(logits.dtype)[:, None]
    ce_on_q = ce_coef if ce_probs is None else None
    if teacher_sparse is None:
        assert teacher_logits is not None
        teacher_top1 = teacher_logits.argmax(-1)
        kd, teacher_entropy = _dense_teacher(
            objective, student_logprobs, student_probs, teacher_logits, buffers.get("teacher_logprobs", rows),
            need_grad, kd_scale, ce_on_q,
        )  # fmt: skip
    else:
        best = teacher_sparse.topk_logprobs.argmax(-1, keepdim=True)
        teacher_top1 = teacher_sparse.topk_ids.gather(-1, best).squeeze(-1)
        if objective.tail == "renormalize":
            kd, teacher_entropy = _renormalized_support(
                objective, student_topk_tempered, teacher_sparse, student_probs, need_grad, kd_scale, ce_on_q
            )
        else:
            kd, teacher_entropy = _bucket_support(
                objective, student_logprobs, student_probs, teacher_sparse, need_grad, kd_scale, ce_on_q
            )

    agree = (student_top1 == teacher_top1).to(kd.dtype)
    if ce is None:
        ce = torch.zeros_like(kd)
    else:
        assert has_label is not None
        ce = torch.where(has_label, ce, torch.zeros_like(ce))
    if need_grad:
        _finish_gradient(student_probs, ce_coef, ce_probs, safe_labels, slope)
    return TokenLosses(kd, ce, agree, teacher_entropy)


def _untempered_ce(logits: Tensor, safe_labels: Tensor, probs_out: Tensor) -> tuple[Tensor, Tensor]:
    """The CE term at T = 1 when the KD's temperature is not 1: ``softmax(z)`` into ``probs_out`` and ``[n]`` CE.

    Computed from the raw logits before they are tempered (in place) for the KD term.
    """
    row_max = logits.amax(-1, keepdim=True)
    probs = torch.sub(logits, row_max, out=probs_out).exp_()
    sum_exp = probs.sum(-1, keepdim=True)
    probs.div_(sum_exp)
    ce = (sum_exp.log() - (logits.gather(-1, safe_labels) - row_max)).squeeze(-1)  # no cancellation in max
    return probs, ce


def _dense_teacher(
    objective: Objective,
    student_logprobs: Tensor,
    student_probs: Tensor,
    teacher_logits: Tensor,
    teacher_logprobs_out: Tensor,
    need_grad: bool,
    kd_scale: float,
    ce_on_q: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """KD against a dense teacher: ``[n]`` values and teacher entropies; the gradient written over ``student_probs``.

    ``teacher_logits`` is consumed (its storage becomes the teacher's probabilities). The gradient is taken
    through the student's log-softmax (``g - q * sum(g)``), plus ``ce_on_q * q`` when the CE's softmax is ``q``.
    """
    teacher_logprobs, teacher_probs = _log_softmax_and_probs(
        teacher_logits, objective.temperature, teacher_logprobs_out
    )
    teacher_entropy = -row_sum_of_product(teacher_probs, teacher_logprobs)
    kd, grad = objective.divergence.value_and_grad(
        student_logprobs, teacher_logprobs, student_probs, teacher_probs, finite=True, scale=kd_scale
    )
    if need_grad:
        coefficient = grad.sum(-1, keepdim=True).neg_()
        if ce_on_q is not None:
            coefficient += ce_on_q
        torch.addcmul(grad, student_probs, coefficient, out=student_probs)
    return kd, teacher_entropy


def _finish_gradient(
    grad: Tensor,
    ce_coef: Tensor | None,
    ce_probs: Tensor | None,
    safe_labels: Tensor | None,
    slope: Tensor | None,
) -> None:
    """The CE's ``softmax - onehot`` terms not folded in yet, then the soft-cap's slope, in place on ``grad``."""
    if ce_coef is not None:
        if ce_probs is not None:
            grad.addcmul_(ce_probs, ce_coef)
        assert safe_labels is not None
        grad.scatter_add_(-1, safe_labels, -ce_coef)
    if slope is not None:
        grad.mul_(slope)


def _support_entropy(teacher_support: Tensor) -> Tensor:
    """``[n]`` entropy of the teacher over its support, ``0 * log 0`` taken as 0."""
    probs = teacher_support.exp()
    return -torch.special.xlogy(probs, probs).sum(-1)


def _bucket_support(
    objective: Objective,
    student_logprobs: Tensor,
    student_probs: Tensor,
    teacher_sparse: SparseTargets,
    need_grad: bool,
    kd_scale: float,
    ce_on_q: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """KD on the top-k + tail support: values and teacher entropy; the gradient is written over ``student_probs``.

    The gradient is ``kd_scale * dKD / d(z / T)`` plus ``ce_on_q * q`` (``[n, 1]``, or None for none).
    """
    ids = teacher_sparse.topk_ids
    vocab = student_logprobs.shape[-1]
    teacher_topk_logprobs = upcast(teacher_sparse.topk_logprobs)
    student_topk_logprobs = student_logprobs.gather(-1, ids)
    student_topk_probs = student_probs.gather(-1, ids)
    if ids.shape[-1] >= vocab:
        # The top-k covers the whole vocabulary: the tail is empty on both sides.
        student_tail_mass = torch.zeros_like(student_topk_logprobs[:, :1])
        student_tail, teacher_tail = torch.full_like(student_tail_mass, -math.inf), None
    else:
        # The student's tail mass summed over the other tokens (no cancellation against the top-k):
        # zero the top-k entries of q, sum, put them back.
        student_tail_mass = student_probs.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)
        student_probs.scatter_(-1, ids, student_topk_probs)
        # Floored at the dtype's tiny (a student tail below ~1e-38 in float32), so its log stays finite.
        student_tail = student_tail_mass.clamp_min(torch.finfo(student_tail_mass.dtype).tiny).log()
        teacher_tail = objective._teacher_tail_logmass(teacher_sparse, teacher_topk_logprobs)[:, None]
    if teacher_tail is None:
        teacher_tail = student_tail
    student_support = torch.cat([student_topk_logprobs, student_tail], dim=-1)
    teacher_support = torch.cat([teacher_topk_logprobs, teacher_tail], dim=-1)
    entropy = _support_entropy(teacher_support)
    student_support_probs = student_support.exp()
    kd, grad_support = objective.divergence.value_and_grad(
        student_support, teacher_support, student_support_probs, teacher_support.exp(), finite=False
    )
    if need_grad:
        grad_sum = grad_support.sum(-1, keepdim=True)
        # Off the top-k: g_tail * q_v / q_tail - q_v * sum(g); on it: g_v - q_v * sum(g) (then scaled, + CE's q).
        tiny = torch.finfo(student_tail_mass.dtype).tiny
        off_topk = (grad_support[:, -1:] / student_tail_mass.clamp_min(tiny) - grad_sum) * kd_scale
        on_topk = (grad_support[:, :-1] - student_topk_probs * grad_sum) * kd_scale
        if ce_on_q is not None:
            off_topk, on_topk = off_topk + ce_on_q, on_topk + student_topk_probs * ce_on_q
        student_probs.mul_(off_topk).scatter_(-1, ids, on_topk)
    return kd, entropy


def _renormalized_support(
    objective: Objective,
    student_topk_tempered: Tensor,
    teacher_sparse: SparseTargets,
    student_probs: Tensor,
    need_grad: bool,
    kd_scale: float,
    ce_on_q: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """KD on the renormalised top-k: values and teacher entropy; the gradient is written over ``student_probs``.

    The gradient is ``kd_scale * dKD / d(z / T)`` (zero off the top-k) plus ``ce_on_q * q``.
    """
    ids = teacher_sparse.topk_ids
    student_support = torch.log_softmax(student_topk_tempered, dim=-1)
    teacher_support = torch.log_softmax(upcast(teacher_sparse.topk_logprobs) / objective.temperature, dim=-1)
    entropy = _support_entropy(teacher_support)
    student_support_probs = student_support.exp()
    kd, grad_support = objective.divergence.value_and_grad(
        student_support, teacher_support, student_support_probs, teacher_support.exp(), finite=False
    )
    if need_grad:
        grad_support = (grad_support - student_support_probs * grad_support.sum(-1, keepdim=True)) * kd_scale
        base = student_probs.zero_() if ce_on_q is None else student_probs.mul_(ce_on_q)
        base.scatter_add_(-1, ids, grad_support)
    return kd, entropy

"""Losses between a student and a teacher with different vocabularies, over aligned spans, chunked.

The text is cut into spans that both tokenizations cover identically (:mod:`distill.data.alignment`).
At the first token of a span both models have read the same text, so their next-token distributions
describe the same event once mapped onto common outcomes. The KD term is computed there, once per
span; every student token still gets the hard-label CE (``ce_weight``). The total is the mean over the
student's loss tokens of ``kd_weight * KD + ce_weight * CE`` with KD counted at span starts (0 inside a
span): with identical tokenizers every token is a span of one token and this is exactly the
same-vocabulary loss.

Three KD terms (``kind``):

* ``"pkl"`` (projected KL, any :class:`~distill.losses.Divergence`): both distributions are pushed onto
  *classes*, the teacher tokens the student can express (:class:`VocabProjection`): a student token's
  mass goes to the class of the first teacher token of its text; a teacher token the student has no
  token for gives its mass to the class its first student token maps to. Both pushforwards are proper
  distributions over the same outcomes, so every divergence applies (a lower bound of the full one by
  the data processing inequality, exact for identical tokenizers). With a top-k teacher, its top-k
  classes plus one tail bucket, as in :mod:`distill.losses.sparse`.
* ``"uld"``: Universal Logit Distillation (Boizard et al., 2024, https://arxiv.org/abs/2402.12030): the
  L1 distance between the two probability vectors sorted in decreasing order (zero-padded to one
  length), a Wasserstein distance that needs no vocabulary mapping. With a top-k teacher: the top-k
  sorted probabilities plus the tail mass as one value (a lower bound of the full form).
* ``"gold"``: GOLD's hybrid (TRL ``GOLDTrainer``, ``uld_use_hybrid_loss``): the divergence over the
  tokens whose strings are identical in both vocabularies (plus one bucket for all others, so it is a
  divergence of proper distributions) weighted by the matched fraction of the teacher's vocabulary,
  plus ULD over the unmatched tokens weighted by the rest. Dense teachers only.

Differences from GOLD, on purpose: GOLD multiplies a multi-token span's first distribution by the
probabilities of the span's later tokens (an unnormalised product); here the span's first
distributions are compared as they are, and the later tokens train through CE. GOLD materialises both
models' ``[tokens x vocab]`` logits; here nothing larger than ``[chunk x vocab]`` exists at once, and
gradients are pushed into the head chunk by chunk, as in :mod:`distill.losses.fused`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from distill.losses.objective import DistillationOutput, Objective, check_finite, summarize, upcast
from distill.losses.targets import OutputHead, SparseTargets, TeacherHead, as_output_head

__all__ = ["CROSS_VOCAB_LOSSES", "CrossVocabKind", "VocabProjection", "cross_vocab_loss", "project_logprobs"]

CrossVocabKind = Literal["pkl", "uld", "gold"]
CROSS_VOCAB_LOSSES: tuple[str, ...] = ("pkl", "uld", "gold")
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


@dataclass
class _Grouping:
    """How one vocabulary's ids fall into classes, split into one-member classes (copied) and the rest (summed)."""

    single_ids: Tensor
    single_classes: Tensor
    multi_ids: Tensor
    multi_member_classes: Tensor
    multi_classes: Tensor

    @classmethod
    def of(cls, classes: Tensor, num_classes: int) -> _Grouping:
        counts = torch.bincount(classes, minlength=num_classes)
        single = counts[classes] == 1
        ids = torch.arange(classes.numel(), device=classes.device)
        multi_classes = (counts > 1).nonzero().squeeze(-1)
        return cls(ids[single], classes[single], ids[~single], classes[~single], multi_classes)

    def to(self, device: torch.device) -> _Grouping:
        return _Grouping(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


@dataclass
class VocabProjection:
    """Where each student and teacher token's probability goes: a class (a teacher token id, or "elsewhere").

    Built by :func:`distill.models.vocab_map.build_vocab_map`; this holds its tensors only.

    Attributes:
        student_classes: ``[V_s]`` class of each student head row.
        teacher_classes: ``[V_t]`` class of each teacher head row.
        num_classes: number of classes (teacher rows, plus one "elsewhere" class when some token maps
            nowhere; its log-probability is floored at float32's tiny on both sides, so it stays finite).
        matched_student, matched_teacher: ``[P]`` pairs of ids whose strings are identical (GOLD's hybrid).
    """

    student_classes: Tensor
    teacher_classes: Tensor
    num_classes: int
    matched_student: Tensor
    matched_teacher: Tensor

    def __post_init__(self) -> None:
        self.student_grouping = _Grouping.of(self.student_classes, self.num_classes)
        self.teacher_grouping = _Grouping.of(self.teacher_classes, self.num_classes)
        self.elsewhere = self.num_classes - 1 if self.num_classes > self.teacher_classes.numel() else None

    def to(self, device: torch.device | str) -> VocabProjection:
        """The same projection on ``device`` (groupings are recomputed there once)."""
        device = torch.device(device)
        if self.student_classes.device == device:
            return self
        return VocabProjection(
            self.student_classes.to(device),
            self.teacher_classes.to(device),
            self.num_classes,
            self.matched_student.to(device),
            self.matched_teacher.to(device),
        )


def project_logprobs(logprobs: Tensor, grouping: _Grouping, num_classes: int, elsewhere: int | None) -> Tensor:
    """``[n, V] -> [n, C]`` log-probabilities summed per class (``-inf`` for a class without members).

    A class with one member copies its log-probability unchanged (so an identity map is exact); others
    are summed as probabilities, shifted by the row maximum.
    """
    out = logprobs.new_full((logprobs.shape[0], num_classes), -math.inf)
    if grouping.single_ids.numel():
        out.index_copy_(1, grouping.single_classes, logprobs.index_select(1, grouping.single_ids))
    if grouping.multi_ids.numel():
        members = logprobs.index_select(1, grouping.multi_ids)
        shift = members.amax(-1, keepdim=True).clamp_min(-1e30).detach()
        sums = logprobs.new_zeros(logprobs.shape[0], num_classes).index_add(
            1, grouping.multi_member_classes, (members - shift).exp()
        )
        summed = sums.index_select(1, grouping.multi_classes).log() + shift
        out.index_copy_(1, grouping.multi_classes, summed)
    if elsewhere is not None:
        column = torch.tensor([elsewhere], device=out.device)
        out = out.index_copy(1, column, out.index_select(1, column).clamp_min(_LOG_TINY))
    return out


def _sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``[n]`` L1 distance of both probability vectors sorted in decreasing order, the shorter zero-padded."""
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = torch.nn.functional.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = torch.nn.functional.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1)


class _SpanKD:
    """The KD term at span starts, for one chunk: student log-probs ``[c, V_s]`` and teacher targets in."""

    def __init__(self, kind: CrossVocabKind, objective: Objective, projection: VocabProjection) -> None:
        self.kind, self.objective, self.projection = kind, objective, projection

    def dense(self, student_logprobs: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """``([c] KD, [c] teacher entropy)`` against a dense teacher's ``[c, V_t]`` logits."""
        objective, projection = self.objective, self.projection
        teacher_logits = upcast(teacher_logits)
        if objective.temperature != 1.0:
            teacher_logits = teacher_logits / objective.temperature
        teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)
        with torch.no_grad():
            entropy = -torch.special.xlogy(teacher_logprobs.exp(), teacher_logprobs.exp()).sum(-1)
        if self.kind == "uld":
            return _sorted_l1(student_logprobs.exp(), teacher_logprobs.exp()), entropy
        if self.kind == "gold":
            return self._gold(student_logprobs, teacher_logprobs), entropy
        student_classes = project_logprobs(
            student_logprobs, projection.student_grouping, projection.num_classes, projection.elsewhere
        )
        teacher_classes = project_logprobs(
            teacher_logprobs, projection.teacher_grouping, projection.num_classes, projection.elsewhere
        )
        return objective.divergence(student_classes, teacher_classes), entropy

    def _gold(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        projection = self.projection
        student_rest = torch.ones_like(student_logprobs[0], dtype=torch.bool).index_fill(
            0, projection.matched_student, 0
        )
        teacher_rest = torch.ones_like(teacher_logprobs[0], dtype=torch.bool).index_fill(
            0, projection.matched_teacher, 0
        )

        def with_rest(logprobs: Tensor, matched: Tensor, rest: Tensor) -> Tensor:
            # The unmatched mass as the logsumexp of its own entries, not log(1 - matched mass): that subtraction
            # cancels when the matched tokens hold nearly all the mass (a confident teacher), and reverse KL
            # weighs the teacher's log of it by the student's mass (1.6e-4 relative error of the KD term at
            # 23 tokens; a clamp at 1 - 1e-7 also floored it at log 1e-7).
            rest_logmass = torch.logsumexp(logprobs[:, rest], dim=-1, keepdim=True).clamp_min(_LOG_TINY)
            return torch.cat([logprobs.index_select(1, matched), rest_logmass], dim=-1)

        matched_kd = self.objective.divergence(
            with_rest(student_logprobs, projection.matched_student, student_rest),
            with_rest(teacher_logprobs, projection.matched_teacher, teacher_rest),
        )
        unmatched = _sorted_l1(student_logprobs[:, student_rest].exp(), teacher_logprobs[:, teacher_rest].exp())
        weight = projection.matched_teacher.numel() / teacher_logprobs.shape[-1]
        return weight * matched_kd + (1.0 - weight) * unmatched

    def sparse(self, student_logprobs: Tensor, targets: SparseTargets) -> tuple[Tensor, Tensor]:
        """``([c] KD, [c] teacher entropy)`` against a top-k teacher (ids ``[c, k]`` in its vocabulary)."""
        objective, projection = self.objective, self.projection
        teacher_topk = upcast(targets.topk_logprobs)
        teacher_tail = Objective._teacher_tail_logmass(targets, teacher_topk)[..., None]
        if self.kind == "uld":
            student_top = student_logprobs.exp().topk(teacher_topk.shape[-1], dim=-1).values
            student_tail = (1.0 - student_top.sum(-1, keepdim=True)).clamp_min(0.0)
            teacher_probs = torch.cat([teacher_topk.exp(), teacher_tail.exp()], dim=-1)
            kd = _sorted_l1(student_top, teacher_probs[:, :-1]) + (student_tail - teacher_probs[:, -1:]).abs()[:, 0]
            return kd, _entropy(torch.cat([teacher_topk, teacher_tail], dim=-1))
        if self.kind == "gold":
            raise ValueError("cross_tokenizer_loss='gold' needs a dense teacher (a model); use 'pkl' or 'uld'.")
        classes = projection.teacher_classes[targets.topk_ids]
        same = classes[:, :, None] == classes[:, None, :]
        earlier = torch.ones_like(same[0]).tril(-1)
        first = ~(same & earlier).any(-1)
        merged = torch.logsumexp(teacher_topk[:, None, :].masked_fill(~same, -math.inf), dim=-1)
        teacher_support = merged.masked_fill(~first, -math.inf)
        student_classes = project_logprobs(
            student_logprobs, projection.student_grouping, projection.num_classes, projection.elsewhere
        )
        student_support = student_classes.gather(-1, classes).masked_fill(~first, -math.inf)
        if objective.tail == "renormalize":
            student_support = torch.log_softmax(student_support / objective.temperature, dim=-1)
            teacher_support = torch.log_softmax(teacher_support / objective.temperature, dim=-1)
        else:
            student_tail = torch.logsumexp(student_classes.scatter(-1, classes, -math.inf), dim=-1, keepdim=True)
            student_support = torch.cat([student_support, student_tail], dim=-1)
            teacher_support = torch.cat([teacher_support, teacher_tail], dim=-1)
        return objective.divergence(student_support, teacher_support), _entropy(teacher_support)


def _complement(ids: Tensor, size: int) -> Tensor:
    """``[size]`` bool mask, False at ``ids``."""
    return torch.ones(size, dtype=torch.bool, device=ids.device).index_fill(0, ids, False)


def _entropy(logprobs: Tensor) -> Tensor:
    with torch.no_grad():
        return -torch.special.xlogy(logprobs.exp(), logprobs.exp()).sum(-1)


class _CrossVocabFused(torch.autograd.Function):
    """Loss and its gradients in one chunked pass over the student's loss tokens (as in the fused form)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        span_of_row: Tensor,
        teacher: TeacherHead | SparseTargets,
        body: _SpanKD,
        student_softcap: float | None,
        chunk_size: int,
        scale: float,
    ) -> tuple[Tensor, ...]:
        objective = body.objective
        accumulate_dtype = upcast(weight[:0]).dtype
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate_dtype) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate_dtype) if needs_bias and bias is not None else None
        sums = hidden.new_zeros(5, dtype=accumulate_dtype)  # loss, kd, ce, agreement, teacher entropy
        student_head = OutputHead(weight, bias)  # raw logits: the soft-capping is differentiated below
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            raw_logits = upcast(student_head.logits(hidden[rows])).requires_grad_(True)
            spans = span_of_row[rows]
            kd_rows = (spans >= 0).nonzero().squeeze(-1)  # host-device sync per chunk: which rows start a span
            with torch.enable_grad():
                student_logits = (
                    raw_logits
                    if student_softcap is None
                    else student_softcap * torch.tanh(raw_logits / student_softcap)
                )
                logprobs_t1 = torch.log_softmax(student_logits, dim=-1)
                chunk_labels = labels[rows]
                has_label = chunk_labels != objective.ignore_index
                safe = torch.where(has_label, chunk_labels, torch.zeros_like(chunk_labels))
                ce = -logprobs_t1.gather(-1, safe[:, None])[:, 0].masked_fill(~has_label, 0.0)
                kd, entropy, agree = raw_logits.new_zeros(0), raw_logits.new_zeros(0), raw_logits.new_zeros(0)
                if kd_rows.numel():
                    span_ids = spans[kd_rows]
                    kd_logits = student_logits[kd_rows]
                    tempered = kd_logits / objective.temperature if objective.temperature != 1.0 else kd_logits
                    kd_logprobs = (
                        torch.log_softmax(tempered, dim=-1) if objective.temperature != 1.0 else (logprobs_t1[kd_rows])
                    )
                    if isinstance(teacher, TeacherHead):
                        teacher_logits = teacher.head.logits(teacher.hidden[span_ids])
                        kd, entropy = body.dense(kd_logprobs, teacher_logits)
                        teacher_top1 = projected_top1(teacher_logits.argmax(-1), body.projection)
                    else:
                        chunk_targets = teacher.take(span_ids)
                        kd, entropy = body.sparse(kd_logprobs, chunk_targets)
                        best = chunk_targets.topk_logprobs.argmax(-1, keepdim=True)
                        teacher_top1 = projected_top1(chunk_targets.topk_ids.gather(-1, best)[:, 0], body.projection)
                    student_top1 = body.projection.student_classes[kd_logits.argmax(-1)]
                    agree = (student_top1 == teacher_top1).to(kd.dtype)
                chunk_loss = objective.kd_weight * kd.sum() + objective.ce_weight * ce.sum()
                (grad_logits,) = torch.autograd.grad(chunk_loss * scale, raw_logits)
            sums += torch.stack(
                [chunk_loss.detach(), kd.detach().sum(), ce.detach().sum(), agree.sum(), entropy.sum()]
            ).to(accumulate_dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].to(accumulate_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grads = [g if g is None or like is None else g.to(like.dtype) for g, like in
                 ((grad_hidden, hidden), (grad_weight, weight), (grad_bias, bias))]  # fmt: skip
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(sums)
        return sums[0] * scale, sums[1], sums[2], sums[3], sums[4]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *unused: Tensor
    ) -> tuple[Tensor | None, ...]:
        grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)  # type: ignore[attr-defined]
        return (*grads, None, None, None, None, None, None, None)


def projected_top1(teacher_ids: Tensor, projection: VocabProjection) -> Tensor:
    """``[n]`` class of the teacher's most likely token (compared with the student's for top-1 agreement)."""
    return projection.teacher_classes[teacher_ids]


def cross_vocab_loss(
    student_hidden: Tensor,
    student_weight: Tensor | OutputHead,
    labels: Tensor,
    span_of_row: Tensor,
    teacher: TeacherHead | SparseTargets,
    projection: VocabProjection,
    kind: CrossVocabKind = "pkl",
    objective: Objective | None = None,
    *,
    student_bias: Tensor | None = None,
    student_softcap: float | None = None,
    chunk_size: int = 256,
) -> DistillationOutput:
    """Cross-tokenizer distillation loss over the student's loss tokens, chunked.

    Args:
        student_hidden: ``[N, H]`` the student's final hidden states at its loss positions (the
            position before each token it is trained to predict).
        student_weight: ``[V_s, H]`` the student's head weight, or its whole head as an :class:`OutputHead`
            (weight, bias, soft-cap; then ``student_bias`` and ``student_softcap`` stay ``None``).
        labels: ``[N]`` the student's next-token ids there (``objective.ignore_index`` for none).
        span_of_row: ``[N]`` the span index whose first token row ``i`` predicts, or -1 (inside a span).
        teacher: the teacher's targets at the span starts: :class:`TeacherHead` with ``hidden``
            ``[J, H_t]``, or :class:`SparseTargets` ``[J, k]`` (ids in the teacher's vocabulary).
        projection: the vocabulary map's tensors.
        kind: ``pkl``, ``uld`` or ``gold`` (see the module docstring).
        objective: divergence, temperature, weights and tail handling (``vocab_size`` is unused).
        student_bias, student_softcap: the student head's bias and final-logit soft-capping.
        chunk_size: student rows per chunk.

    Returns:
        :class:`DistillationOutput`: ``loss`` = ``(kd_weight * sum of span KD + ce_weight * sum of CE) / N``
        (differentiable in the student's hidden states, head and bias); ``kd_loss`` and
        ``top1_agreement`` are means over spans (agreement of the two argmax tokens' classes),
        ``ce_loss`` over tokens with a label.
    """
    if kind not in CROSS_VOCAB_LOSSES:
        raise ValueError(f"Unknown cross-tokenizer loss {kind!r}; choose one of {CROSS_VOCAB_LOSSES}.")
    objective = objective or Objective()
    head = as_output_head(student_weight, student_bias, student_softcap)
    if isinstance(teacher, SparseTargets) and kind == "pkl" and objective.tail == "bucket":
        if objective.temperature != 1.0:
            raise ValueError("tail='bucket' needs temperature=1 (see distill.losses.sparse); use tail='renormalize'.")
    if isinstance(teacher, SparseTargets):
        teacher = teacher.flatten()
    else:
        hidden_t = teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1])
        teacher = TeacherHead(hidden_t, teacher.weight.detach(), teacher.bias, teacher.softcap)
        check_finite(hidden_t, "Teacher hidden states")
    check_finite(student_hidden, "Student hidden states")
    projection = projection.to(student_hidden.device)
    num_rows = student_hidden.shape[0]
    num_spans = int((span_of_row >= 0).sum())  # host-device sync (the spans' mean)
    scale = 1.0 / max(num_rows, 1)
    body = _SpanKD(kind, objective, projection)
    loss, kd_sum, ce_sum, agree_sum, entropy_sum = _CrossVocabFused.apply(
        student_hidden, head.weight, head.bias, labels, span_of_row, teacher, body, head.softcap, chunk_size, scale,
    )  # fmt: skip
    out = summarize(loss, kd_sum, ce_sum, agree_sum, entropy_sum, num_rows, True)
    spans = max(num_spans, 1)
    out.kd_loss, out.top1_agreement = kd_sum.detach() / spans, agree_sum.detach() / spans
    out.teacher_entropy = entropy_sum.detach() / spans
    labelled = max(int((labels != objective.ignore_index).sum()), 1)  # host-device sync (the CE's mean)
    out.ce_loss = ce_sum.detach() / labelled
    return out

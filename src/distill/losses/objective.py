"""What is minimised, and the per-token body that the dense, sparse and fused forms all share.

:class:`Objective` holds the loss's settings (divergence, temperature, weights, how a sparse
teacher's tail is handled, the shared vocabulary range). :meth:`Objective.token_losses` turns one
block of student logits and the matching teacher targets into per-token KD and CE values: the dense
form calls it once on all tokens, the fused form once per chunk of tokens, so the three forms cannot
drift apart.

Temperature convention: the KD term compares ``softmax(student_logits / T)`` with
``softmax(teacher_logits / T)``; it is *not* multiplied by ``T**2`` (as in TRL and Liger; multiply
``kd_weight`` by ``T**2`` for Hinton et al.'s gradient scale). The CE term always uses ``T = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from distill.losses.divergences import Divergence
from distill.losses.targets import SparseTargets

__all__ = ["DistillationOutput", "Objective", "TailMode", "TokenLosses", "check_finite", "upcast"]

TailMode = Literal["bucket", "renormalize"]


def upcast(tensor: Tensor) -> Tensor:
    """``tensor`` in the dtype the softmax math runs in: float32, or float64 if it already is."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


class NonFiniteInputError(ValueError):
    """A loss input (logits, hidden states) holds NaN or infinite values."""


def check_finite(tensor: Tensor, what: str) -> None:
    """Refuse NaN or infinite values in ``tensor`` (e.g. an fp16 overflow upstream), naming ``what``."""
    if not bool(torch.isfinite(tensor).all()):  # host-device sync: a NaN must stop before it reaches the weights
        raise NonFiniteInputError(
            f"{what} contain NaN or infinite values; the loss would be NaN. Check the model's dtype (fp16 overflows; "
            "prefer bf16) and mask disallowed tokens through labels, not with -inf logits."
        )


class TokenLosses(NamedTuple):
    """Per-token values for one block of tokens, each ``[n]`` in the compute dtype (float32 or float64).

    Attributes:
        kd: divergence between teacher and student at each token (nats; TVD in probability units).
        ce: hard-label cross-entropy of the student at T=1 (nats); zeros where there is no label.
        agree: 1.0 where the student's and teacher's most likely tokens are the same, else 0.0.
        teacher_entropy: entropy of the (tempered) teacher distribution the student is matched to
            (nats); for a sparse teacher, over its top-k plus the tail as one outcome (``bucket``,
            a lower bound of the full entropy) or over the renormalised top-k (``renormalize``).
    """

    kd: Tensor
    ce: Tensor
    agree: Tensor
    teacher_entropy: Tensor


@dataclass
class DistillationOutput:
    """What a distillation loss returns.

    Attributes:
        loss: ``kd_weight * kd + ce_weight * ce`` under the requested reduction; the only
            differentiable field. Scalar for ``mean`` / ``sum``, ``[batch, seq]`` for ``none``.
        kd_loss: detached mean KD over unmasked tokens (scalar).
        ce_loss: detached mean CE over unmasked tokens (scalar; NaN when no labels were given).
        top1_agreement: detached fraction of unmasked tokens where the student's argmax equals the
            teacher's.
        num_tokens: number of unmasked tokens the means are taken over.
        teacher_entropy: detached mean entropy of the teacher's target distribution over unmasked
            tokens (nats; see :class:`TokenLosses`). Low values mean near one-hot targets, where KD
            adds little over hard labels.
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    top1_agreement: Tensor
    num_tokens: int
    teacher_entropy: Tensor | None = None


@dataclass(frozen=True)
class Objective:
    """The settings of a distillation loss, checked once.

    Attributes:
        divergence: the KD divergence and its parameters.
        temperature: softens both distributions in the KD term (must be > 0).
        kd_weight: weight of the KD term.
        ce_weight: weight of the hard-label cross-entropy term (needs labels when > 0).
        tail: sparse teacher only, how the mass outside the teacher's top-k is treated:
            ``"bucket"`` adds one extra outcome "any other token" to both distributions (the
            student's mass there is exact, computed from its full softmax), so the loss is the
            divergence between the two coarse-grained distributions: a lower bound of the full
            divergence (data processing inequality), that still pushes the student's tail mass
            towards the teacher's. ``"renormalize"`` drops the tail and renormalises both
            distributions over the top-k tokens: it compares the conditionals given "the token is in
            the teacher's top-k", so the student is never told how much mass to leave outside it.
        vocab_size: use only the first ``vocab_size`` rows of the vocabulary on both sides (the
            rows of a tokenizer both models share; the rest are padding). ``None`` means all.
        ignore_index: label value that marks a token to leave out of every term.
    """

    divergence: Divergence = field(default_factory=Divergence)
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    tail: TailMode = "bucket"
    vocab_size: int | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}.")
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError(f"kd_weight and ce_weight must be >= 0; got {self.kd_weight}, {self.ce_weight}.")
        if self.tail not in ("bucket", "renormalize"):
            raise ValueError(f"tail must be 'bucket' or 'renormalize'; got {self.tail!r}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive number of vocabulary rows; got {self.vocab_size}.")

    @classmethod
    def from_kwargs(
        cls,
        divergence: str = "jsd",
        beta: float = 0.5,
        alpha: float = 0.1,
        **kwargs: object,
    ) -> Objective:
        """Build from the flat keyword arguments the functional losses take."""
        return cls(divergence=Divergence(divergence, beta=beta, alpha=alpha), **kwargs)  # type: ignore[arg-type]

    def token_losses(
        self,
        student_logits: Tensor,
        labels: Tensor | None,
        teacher_logits: Tensor | None = None,
        teacher_sparse: SparseTargets | None = None,
    ) -> TokenLosses:
        """Per-token KD, CE and agreement for one block of ``n`` tokens.

        Args:
            student_logits: ``[n, V_s]`` student logits (any float dtype; computed in float32, or
                float64 when given float64).
                Only the first ``vocab_size`` columns are used.
            labels: ``[n]`` target token ids (``ignore_index`` where none), or ``None``.
            teacher_logits: ``[n, V_t]`` dense teacher logits, or ``None`` if ``teacher_sparse``.
            teacher_sparse: the teacher's top-k targets for these ``n`` tokens.

        Returns:
            :class:`TokenLosses` with ``[n]`` tensors; values at ignored tokens are
            computed but meaningless (callers mask them).
        """
        vocab = self.vocab_size or student_logits.shape[-1]
        student_logits = upcast(student_logits[..., :vocab])
        student_tempered = student_logits / self.temperature if self.temperature != 1.0 else student_logits
        student_logprobs = torch.log_softmax(student_tempered, dim=-1)

        if teacher_sparse is None:
            assert teacher_logits is not None
            teacher_logits = upcast(teacher_logits[..., :vocab])
            if self.temperature != 1.0:
                teacher_logits = teacher_logits / self.temperature
            # Finite logits (checked by the callers) give finite log-probs: no zero-mass handling needed.
            teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)
            kd = self.divergence(student_logprobs, teacher_logprobs, finite=True)
            teacher_top1 = teacher_logits.argmax(-1)
        else:
            student_support, teacher_support = self._sparse_supports(
                student_tempered, student_logprobs, teacher_sparse, vocab
            )
            kd = self.divergence(student_support, teacher_support)
            teacher_logprobs = teacher_support
            best = teacher_sparse.topk_logprobs.argmax(-1, keepdim=True)
            teacher_top1 = teacher_sparse.topk_ids.gather(-1, best).squeeze(-1)

        agree = (student_logits.argmax(-1) == teacher_top1).to(kd.dtype)
        # Entropy is diagnostics only: computed without a graph, 0 * log 0 taken as 0.
        with torch.no_grad():
            teacher_entropy = -torch.special.xlogy(teacher_logprobs.exp(), teacher_logprobs.exp()).sum(-1)
        if labels is None:
            return TokenLosses(kd, torch.zeros_like(kd), agree, teacher_entropy)
        # The CE term is at T = 1: reuse the KD log-probs when they are the same thing.
        ce_logprobs = student_logprobs if self.temperature == 1.0 else torch.log_softmax(student_logits, dim=-1)
        has_label = labels != self.ignore_index
        safe_labels = torch.where(has_label, labels, torch.zeros_like(labels))
        ce = -ce_logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        return TokenLosses(kd, torch.where(has_label, ce, torch.zeros_like(ce)), agree, teacher_entropy)

    def _sparse_supports(
        self,
        student_tempered: Tensor,
        student_logprobs: Tensor,
        teacher_sparse: SparseTargets,
        vocab: int,
    ) -> tuple[Tensor, Tensor]:
        """Both distributions on the teacher's top-k support (plus the tail bucket, if any).

        Returns ``([n, k or k+1], [n, k or k+1])`` student and teacher log-probabilities.
        """
        ids = teacher_sparse.topk_ids
        teacher_topk_logprobs = upcast(teacher_sparse.topk_logprobs)
        if self.tail == "renormalize":
            student_support = torch.log_softmax(student_tempered.gather(-1, ids), dim=-1)
            teacher_support = torch.log_softmax(teacher_topk_logprobs / self.temperature, dim=-1)
            return student_support, teacher_support

        student_topk_logprobs = student_logprobs.gather(-1, ids)
        if ids.shape[-1] >= vocab:
            # The top-k covers the whole vocabulary (ids are unique): the tail is empty on both sides.
            empty = torch.full_like(student_topk_logprobs[..., :1], -math.inf)
            student_tail, teacher_tail = empty, empty
        else:
            # The student's tail mass from its own softmax over the other tokens: exact, with no
            # cancellation even when its top-k holds almost all of its mass.
            student_tail = torch.logsumexp(student_logprobs.scatter(-1, ids, -math.inf), dim=-1, keepdim=True)
            teacher_tail = self._teacher_tail_logmass(teacher_sparse, teacher_topk_logprobs)[..., None]
        return (
            torch.cat([student_topk_logprobs, student_tail], dim=-1),
            torch.cat([teacher_topk_logprobs, teacher_tail], dim=-1),
        )

    @staticmethod
    def _teacher_tail_logmass(teacher_sparse: SparseTargets, teacher_topk_logprobs: Tensor) -> Tensor:
        """``[n]`` log of the teacher's mass outside its top-k, floored at float32's tiny.

        The floor keeps a divergence finite when rounding made the stored top-k mass reach 1 while
        the student still has mass in its tail (the true tail mass is then below float32's
        resolution anyway).
        """
        if teacher_sparse.tail_mass is not None:
            tail_mass = teacher_sparse.tail_mass.double()
        else:
            # 1 - sum(p) as -expm1(log sum p), in float64: accurate for tails far below float32 eps.
            tail_mass = -torch.expm1(torch.logsumexp(teacher_topk_logprobs.double(), dim=-1))
        tiny = torch.finfo(torch.float32).tiny
        return tail_mass.clamp(min=tiny).log().to(teacher_topk_logprobs.dtype)


Reduction = Literal["mean", "sum", "none"]


def select_valid_rows(labels: Tensor | None, num_rows: int, ignore_index: int) -> Tensor | None:
    """``[n_valid]`` indices of the flattened positions whose label is not ``ignore_index``.

    ``None`` when there are no labels (every position counts). Dropping masked positions before any
    logits are computed means prompt tokens cost no loss compute at all.
    """
    if labels is None:
        return None
    if labels.numel() != num_rows:
        raise ValueError(f"labels have {labels.numel()} positions but the logits/hidden states have {num_rows}.")
    # Host-device sync: the number of loss tokens sizes the chunk loop (and every gather after it).
    return (labels.reshape(-1) != ignore_index).nonzero().squeeze(-1)


def summarize(
    loss: Tensor,
    kd_sum: Tensor,
    ce_sum: Tensor,
    agree_sum: Tensor,
    entropy_sum: Tensor,
    num_tokens: int,
    has_labels: bool,
) -> DistillationOutput:
    """A :class:`DistillationOutput` with detached per-token means from sums over ``num_tokens``.

    Means over zero tokens are 0 (not NaN); ``ce_loss`` is NaN when there were no labels at all.
    """
    denominator = max(num_tokens, 1)
    ce_loss = ce_sum.detach() / denominator if has_labels else torch.full_like(kd_sum.detach(), math.nan)
    return DistillationOutput(
        loss,
        kd_loss=kd_sum.detach() / denominator,
        ce_loss=ce_loss,
        top1_agreement=agree_sum.detach() / denominator,
        num_tokens=num_tokens,
        teacher_entropy=entropy_sum.detach() / denominator,
    )


def reduce_token_losses(
    per_token: TokenLosses,
    objective: Objective,
    reduction: Reduction,
    rows: Tensor | None,
    leading_shape: torch.Size,
    has_labels: bool,
) -> DistillationOutput:
    """Combine per-token values of the selected rows into a :class:`DistillationOutput`.

    Args:
        per_token: values at the selected rows only, ``[n]`` each.
        objective: supplies ``kd_weight`` and ``ce_weight``.
        reduction: ``"mean"`` over the selected tokens (0 when there are none), ``"sum"``, or
            ``"none"`` (a ``leading_shape`` tensor with zeros at unselected positions).
        rows: ``[n]`` flat indices of the selected rows, or ``None`` when all rows were used.
        leading_shape: shape of the positions, e.g. ``[batch, seq]``.
        has_labels: whether labels were given (else the CE mean is NaN).
    """
    weighted = objective.kd_weight * per_token.kd
    if objective.ce_weight:
        weighted = weighted + objective.ce_weight * per_token.ce
    num_tokens = per_token.kd.shape[0]
    if reduction == "mean":
        loss = weighted.sum() / max(num_tokens, 1)
    elif reduction == "sum":
        loss = weighted.sum()
    elif reduction == "none":
        if rows is not None:
            weighted = weighted.new_zeros(leading_shape.numel()).index_copy(0, rows, weighted)
        loss = weighted.reshape(leading_shape)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}.")
    return summarize(
        loss,
        per_token.kd.sum(),
        per_token.ce.sum(),
        per_token.agree.sum(),
        per_token.teacher_entropy.sum(),
        num_tokens,
        has_labels,
    )

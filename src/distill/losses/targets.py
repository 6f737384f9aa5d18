"""The two shapes a teacher's targets take when they reach a loss.

A dense teacher hands over its final hidden states and LM head (:class:`TeacherHead`), from which
the fused loss computes teacher logits one chunk of tokens at a time. A sparse teacher, such as an
offline cache or a server returning top-k log-probs, hands over its top-k token ids and
log-probabilities, and optionally the probability mass left outside them (:class:`SparseTargets`).
Teachers are frozen: no gradient ever flows into these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SparseTargets", "TeacherHead"]


@dataclass
class TeacherHead:
    """A dense teacher's final hidden states and output head.

    Attributes:
        hidden: ``[..., H_t]`` final hidden states (after the final norm), one per student token;
            the leading dimensions match the student's hidden states.
        weight: ``[V_t, H_t]`` LM head weight (the embedding matrix when the head is tied).
        bias: optional ``[V_t]`` head bias.
        softcap: final-logit soft-capping value (``logits = softcap * tanh(logits / softcap)``, as in
            Gemma 2), or ``None``.
        layer_states: for intermediate-layer distillation, the ``[..., H_t]`` outputs of the decoder
            layers the trainer asked for, in the order asked, from the same forward; else ``None``.
            The logit losses ignore them.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    layer_states: tuple[Tensor, ...] | None = None


@dataclass
class SparseTargets:
    """A teacher given by its top-k tokens at every position.

    Attributes:
        topk_ids: ``[..., k]`` int64 token ids, unique within a position.
        topk_logprobs: ``[..., k]`` the teacher's log-probabilities of those tokens, normalised over
            its full vocabulary at temperature 1 (so their exponentials sum to at most 1). A slot
            with log-prob ``-inf`` is allowed (zero mass), e.g. to pad fewer than k entries.
        tail_mass: optional ``[...]`` probability mass outside the top-k. When ``None`` it is
            derived as ``1 - sum(exp(topk_logprobs))``; pass it when the log-probs were stored
            lossily (quantised) so the tail stays exact.
        estimate: the entries are *sampled* targets (:func:`distill.cache.priority_sample`): their
            exponentials are an unbiased estimate of the teacher's probabilities (zero for ids not
            listed), so they need not sum to 1 and nothing is left in a tail. Only the forward KL
            (and the CE it contains) is linear in the teacher's probabilities, so only its gradient
            stays unbiased: the losses refuse other divergences for such targets.
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    tail_mass: Tensor | None = None
    estimate: bool = False

    def to(self, device: torch.device | str) -> SparseTargets:
        """The same targets on ``device``."""
        return SparseTargets(
            self.topk_ids.to(device),
            self.topk_logprobs.to(device),
            None if self.tail_mass is None else self.tail_mass.to(device),
            self.estimate,
        )

    def flatten(self) -> SparseTargets:
        """The same targets with the leading dimensions flattened: ``[N, k]`` and ``[N]``."""
        k = self.topk_ids.shape[-1]
        return SparseTargets(
            self.topk_ids.reshape(-1, k),
            self.topk_logprobs.reshape(-1, k),
            None if self.tail_mass is None else self.tail_mass.reshape(-1),
            self.estimate,
        )

    def take(self, rows: Tensor | slice) -> SparseTargets:
        """Targets of the given flattened rows (an index tensor or a slice; call on flattened targets)."""
        return SparseTargets(
            self.topk_ids[rows],
            self.topk_logprobs[rows],
            None if self.tail_mass is None else self.tail_mass[rows],
            self.estimate,
        )

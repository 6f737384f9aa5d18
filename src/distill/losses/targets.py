"""The two shapes a teacher's targets take when they reach a loss, and the output head they share.

:class:`OutputHead` is a causal LM's head as tensors, with the one :meth:`OutputHead.logits` that turns
hidden states into logits (bias, soft-capping) for every user: the fused loss's chunks, the cached and
top-k teachers, the trainer's dense path and the held-out metrics.
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

__all__ = ["OutputHead", "SparseTargets", "TeacherHead", "as_output_head"]


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head as tensors: ``logits = softcap(hidden @ weight.T + bias)``.

    Attributes:
        weight: ``[V, H]`` head weight (the input embedding when tied).
        bias: ``[V]`` or ``None``.
        softcap: final-logit soft-capping value (``softcap * tanh(logits / softcap)``, Gemma 2 style), or ``None``.
    """

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None

    def logits(self, hidden: Tensor, vocab_size: int | None = None, out: Tensor | None = None) -> Tensor:
        """Logits over head rows ``[0, vocab_size)`` (all rows when ``None``): ``[..., H] -> [..., vocab_size]``.

        Args:
            hidden: ``[..., H]`` final hidden states; 2-D ``[n, H]`` when ``out`` is given.
            vocab_size: head rows to use (the vocabulary shared with the other model).
            out: optional ``[n, vocab_size]`` float32/float64 buffer (the fused loss's chunks). The matmul then
                runs in the inputs' dtypes (autocast applies), straight into ``out`` when they are its dtype,
                else upcast into it; soft-capping is done in place; no gradient flows. Without ``out``
                ``hidden`` is cast to the weight's dtype and the result, in that dtype, is differentiable.
        """
        weight = self.weight[:vocab_size]
        bias = None if self.bias is None else self.bias[:vocab_size]
        if out is None:
            logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
            return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)
        if hidden.dtype != weight.dtype:  # e.g. bf16 states into a QLoRA student's float32 head
            hidden = hidden.to(weight.dtype)
        if hidden.dtype == out.dtype:
            if bias is None:
                torch.mm(hidden, weight.t(), out=out)
            else:
                torch.addmm(bias.to(out.dtype), hidden, weight.t(), out=out)
        else:
            out.copy_(hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t()))
        if self.softcap is not None:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out


def as_output_head(weight: Tensor | OutputHead, bias: Tensor | None, softcap: float | None) -> OutputHead:
    """The student's head as one :class:`OutputHead`, from the public losses' ``(weight, bias, softcap)`` arguments.

    ``weight`` may already be an :class:`OutputHead`; ``bias`` and ``softcap`` must then be ``None`` (one place
    says what the head is).
    """
    if isinstance(weight, OutputHead):
        if bias is not None or softcap is not None:
            raise ValueError("Give the student's bias and soft-cap in its OutputHead or beside its weight, not both.")
        return weight
    return OutputHead(weight, bias, softcap)


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

    @property
    def head(self) -> OutputHead:
        """The head alone (``weight``, ``bias``, ``softcap``), whose :meth:`OutputHead.logits` these targets use."""
        return OutputHead(self.weight, self.bias, self.softcap)

    def logits(self) -> Tensor:
        """``[..., V_t]`` teacher logits of all of :attr:`hidden` at once (the dense, materialised path)."""
        return self.head.logits(self.hidden)


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
        estimate: the entries are *sampled* targets (:func:`distill.formats.sampling.priority_sample`): their
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

"""The one interface every teacher implements: targets for the tokens of a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from distill.losses import Objective, SparseTargets, TeacherHead

TeacherTargets = TeacherHead | SparseTargets


class Teacher(ABC):
    """Where the distillation targets come from.

    A teacher answers one question: for every position of a batch, what distribution over the next
    token should the student match? It answers either densely (:class:`~distill.losses.TeacherHead`:
    its final hidden states and head, so the fused loss builds its logits chunk by chunk) or sparsely
    (:class:`~distill.losses.SparseTargets`: top-k ids and log-probs).

    Attributes:
        tokenizer: the teacher's tokenizer when known (checked against the student's), else ``None``.
        prefetchable: ``targets`` is thread-safe and may run in background threads on CPU tensors,
            answering sparse targets, so the trainer can request the next micro-batches' targets
            while the student trains (a remote teacher).
    """

    tokenizer: Any = None
    prefetchable: bool = False

    @property
    @abstractmethod
    def vocab_rows(self) -> int:
        """Rows of the teacher's output distribution (its head's ``V``, padding rows included)."""

    @abstractmethod
    def targets(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> TeacherTargets:
        """Targets for every position of the batch, on ``input_ids``' device.

        Args:
            input_ids: ``[batch, seq]`` token ids (right-padded).
            attention_mask: ``[batch, seq]`` 1 for real tokens, 0 for padding.
            position_ids: ``[batch, seq]`` positions (restarting per document in packed rows).

        Returns:
            Targets with leading shape ``[batch, seq]``: position ``i`` holds the teacher's
            distribution of token ``i + 1``. Never carries gradients.
        """

    def check_objective(self, objective: Objective) -> None:  # noqa: B027 - a hook: most teachers accept any loss
        """Refuse, before training, a loss this teacher's targets cannot train (default: accept any)."""

    def check_config(self, args: Any) -> None:
        """Refuse, before anything is loaded, training settings this teacher cannot serve.

        The default refuses ``seq_kd`` for a teacher that cannot generate text.

        Args:
            args: the run's :class:`~distill.DistillConfig` (``seq_kd``, ``lmbda``, ``packing``, ``temperature``,
                ``sparse_tail``, ...).
        """
        if getattr(args, "seq_kd", False) and type(self).generate is Teacher.generate:
            raise ValueError(
                f"seq_kd=True trains on the teacher's own completions, and a {type(self).__name__} cannot generate "
                "text. Use a ModelTeacher (in-process) or a ServerTeacher (a vLLM server), or set seq_kd=False."
            )

    def check_dataset(self, rows: Any) -> None:  # noqa: B027 - a hook: most teachers answer for any row
        """Refuse, before training, prepared rows this teacher has no targets for (default: accept all).

        Args:
            rows: the output of :func:`distill.data.prepare_dataset` (``input_ids`` and ``labels``).
        """

    def hidden_state_shape(self) -> tuple[int, int]:
        """``(decoder layers, hidden size)`` of the teacher, for intermediate-layer distillation.

        Only in-process model teachers have hidden states; the default refuses, before training.
        """
        raise ValueError(
            f"{type(self).__name__} gives no hidden states, so intermediate-layer distillation "
            "(hidden_loss_weight > 0) cannot run with it: a cache, a server or the data hold only output "
            "distributions. Set hidden_loss_weight=0, or use an in-process teacher (a model or a path: ModelTeacher)."
        )

    def request_hidden_states(self, layers: tuple[int, ...]) -> None:
        """From now on, :meth:`targets` also returns the outputs of these decoder layers (``layer_states``).

        Args:
            layers: decoder layer indices (0-based), in the order the targets should carry them.
        """
        self.hidden_state_shape()  # the refusal, for teachers without hidden states
        raise NotImplementedError(f"{type(self).__name__} has hidden states but cannot return them.")

    def generate(self, prompt_ids: Tensor, prompt_attention_mask: Tensor, **generation_kwargs: Any) -> Tensor:
        """``[batch, prompt + new]`` the prompts continued by the teacher (sequence-level KD).

        Args:
            prompt_ids: ``[batch, prompt]`` left-padded prompt ids.
            prompt_attention_mask: ``[batch, prompt]`` 1 for real tokens.
            generation_kwargs: passed to ``transformers`` ``generate`` (``max_new_tokens``, ...).
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot generate text; seq_kd needs a teacher that can: ModelTeacher (in-process) "
            "or ServerTeacher (a vLLM server)."
        )

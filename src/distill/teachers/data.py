"""The data as the teacher: a one-hot target on the next token, i.e. plain fine-tuning (SFT).

The forward KL from a one-hot distribution on token ``y`` is ``-log q(y)``: exactly the
cross-entropy of supervised fine-tuning. Training with ``DataTeacher`` and ``loss="forward_kl"``
is therefore SFT through the very same trainer, data handling and fused (memory-frugal) loss as
distillation: the fair same-budget baseline that shows what the teacher's distribution adds.
No model runs; the logged ``kd_loss`` is the CE and ``top1_agreement`` the next-token accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses import SparseTargets
from distill.teachers.base import Teacher

__all__ = ["DataTeacher"]


class DataTeacher(Teacher):
    """A teacher that puts all its mass on the token that actually comes next.

    Args:
        vocab_rows: rows of the (virtual) teacher head: the student's head size, or more.
    """

    def __init__(self, vocab_rows: int) -> None:
        self._vocab_rows = vocab_rows

    @property
    def vocab_rows(self) -> int:
        return self._vocab_rows

    def targets(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> SparseTargets:
        """``[batch, seq, 1]``: position ``i``'s target is token ``i + 1`` with log-prob 0 (no tail).

        The last position (and any position the labels mask, e.g. a packed document's last token)
        carries no loss, so what it holds is never read.
        """
        next_ids = input_ids.roll(-1, dims=1).unsqueeze(-1)
        zeros = torch.zeros(next_ids.shape, dtype=torch.float32, device=input_ids.device)
        return SparseTargets(next_ids, zeros, zeros[..., 0])

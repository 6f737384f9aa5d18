"""Token-weighted loss over an optimizer step: its micro-batches and its processes count as one big batch.

``transformers.Trainer`` (when the model does not take ``num_items_in_batch``) divides each micro-batch's
mean loss by the number of micro-batches, and DDP / FSDP / DeepSpeed average the gradients over processes.
A step's gradient is then a mean of per-micro-batch means: a micro-batch of 3 loss tokens counts as much as
one of 300 (the loss-normalisation bug of TRL #4560 / #6478 and axolotl #3271). Here the step is one batch:

    loss_m = mean_m * n_m * P / N

with ``mean_m`` the micro-batch's mean over its ``n_m`` loss tokens, ``N`` the loss tokens of the whole step
(every micro-batch on every process) and ``P`` the number of processes (their gradients are averaged, hence
the ``* P``). Summed over micro-batches and averaged over processes the gradient is that of
``sum(all token losses) / N``: the same as one batch holding all the step's tokens, to float rounding.

``N`` must be known before the first backward of the step, so the trainer builds the whole step first
(on-policy micro-batches are generated before any of them trains; see ``Trainer.get_batch_samples``) and
counts its loss tokens here, one all-reduce per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.trainer.batching import IGNORE_INDEX, next_token_labels

LOSS_TOKENS_KEY = "_loss_tokens"  # int: the micro-batch's loss tokens, as counted when the step was built
HIDDEN_TOKENS_KEY = "_hidden_tokens"  # int: the tokens its hidden-state loss counts (0 without that loss)


@dataclass(frozen=True)
class StepTokens:
    """The token counts one optimizer step's loss is normalised by (passed as ``num_items_in_batch``).

    Attributes:
        loss_tokens: loss tokens of the step, over every micro-batch and every process.
        hidden_tokens: tokens the hidden-state loss counts, over the same (0 without that loss).
        processes: processes whose gradients the engine averages.
    """

    loss_tokens: int
    hidden_tokens: int
    processes: int

    def scale(self, tokens: int, hidden: bool = False) -> float:
        """The factor turning a micro-batch's mean over ``tokens`` into its share of the step's loss."""
        total = self.hidden_tokens if hidden else self.loss_tokens
        return tokens * self.processes / max(total, 1)


def count_tokens(batch: dict[str, Any], hidden_mask: Callable[[Tensor | None, Tensor], Tensor] | None) -> None:
    """Write the micro-batch's loss-token (and hidden-loss token) counts into ``batch`` (no device sync).

    Args:
        batch: a collated micro-batch with ``labels`` ``[B, L]`` (unshifted) and maybe ``position_ids``.
        hidden_mask: ``(attention_mask, next-token labels) -> [B, L]`` bool, the hidden-state loss's tokens;
            ``None`` without that loss.
    """
    targets = next_token_labels(batch["labels"], batch.get("position_ids"))
    batch[LOSS_TOKENS_KEY] = (targets != IGNORE_INDEX).sum()
    batch[HIDDEN_TOKENS_KEY] = (
        hidden_mask(batch.get("attention_mask"), targets).sum() if hidden_mask is not None else torch.zeros(())
    )


def step_tokens(batches: list[dict[str, Any]], processes: int, reduce_sum: Callable[[Tensor], Tensor]) -> StepTokens:
    """The step's totals over its micro-batches (already counted by :func:`count_tokens`) and processes.

    Every process must call this once per optimizer step (``reduce_sum`` is a collective). The counts
    are turned into Python ints on every micro-batch, so the trainer can check them against the loss.
    """
    local = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        counts = torch.stack([batch[LOSS_TOKENS_KEY], batch[HIDDEN_TOKENS_KEY]]).to("cpu", torch.float64)
        batch[LOSS_TOKENS_KEY], batch[HIDDEN_TOKENS_KEY] = int(counts[0]), int(counts[1])
        local += counts
    totals = reduce_sum(local).tolist() if processes > 1 else local.tolist()  # host-device sync: once per step
    return StepTokens(loss_tokens=int(totals[0]), hidden_tokens=int(totals[1]), processes=processes)


def check_counted(expected: int, used: int, what: str) -> None:
    """Refuse a loss whose token count is not the one the step was normalised by (its weight would be wrong)."""
    if expected != used:
        raise RuntimeError(
            f"The {what} averaged over {used} tokens but the step counted {expected} for this micro-batch: the "
            "token-weighted accumulation would be wrong. This is a bug in distill; please report it with your config."
        )


__all__ = ["HIDDEN_TOKENS_KEY", "LOSS_TOKENS_KEY", "StepTokens", "check_counted", "count_tokens", "step_tokens"]

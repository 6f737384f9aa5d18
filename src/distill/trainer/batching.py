"""Tensor plumbing of one training step: next-token labels, and batches built from generated text."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
# Batch keys the step adds besides the collator's columns (a leading underscore: never a model input).
GENERATED_KEY = "_generated"  # True when the batch's completions were generated this step (on-policy / seq-KD)


def next_token_labels(labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """``[batch, seq]`` the label each position predicts: ``labels`` shifted left by one.

    Position ``i`` of a causal LM predicts token ``i + 1``, so its target is ``labels[:, i + 1]``; the
    last position predicts nothing (``-100``). In packed rows (``position_ids`` restart at 0 for
    each document) a document's last token would "predict" the next document's first token: that
    pair is masked too.

    Args:
        labels: ``[batch, seq]`` token ids where a token carries loss, ``-100`` elsewhere (unshifted,
            the ``transformers`` convention).
        position_ids: ``[batch, seq]`` positions of packed rows, or ``None``.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts_document = torch.zeros_like(labels, dtype=torch.bool)
        starts_document[:, :-1] = position_ids[:, 1:] == 0
        shifted = shifted.masked_fill(starts_document, IGNORE_INDEX)
    return shifted


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """``[batch, seq]`` position ids that skip left padding (as ``generate`` assigns them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_batch(
    prompt_ids: Tensor,
    prompt_attention_mask: Tensor,
    sequences: Tensor,
    eos_token_ids: list[int],
    pad_token_id: int,
) -> dict[str, Tensor]:
    """A training batch from left-padded prompts and their generated continuations.

    The loss covers each generated token up to and including the first end-of-sequence token;
    what ``generate`` wrote after it (padding of finished rows) is masked out of both attention and
    loss.

    Args:
        prompt_ids: ``[batch, P]`` left-padded prompts given to ``generate``.
        prompt_attention_mask: ``[batch, P]`` 1 for real prompt tokens.
        sequences: ``[batch, P + N]`` what ``generate`` returned (the prompts, then ``N`` new tokens).
        eos_token_ids: ids that end a completion.
        pad_token_id: id ``generate`` pads finished rows with.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels`` (unshifted, ``-100`` on
        prompts and padding), each ``[batch, P + N]``.
    """
    prompt_length = prompt_ids.shape[1]
    new_tokens = sequences[:, prompt_length:]
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for eos in eos_token_ids:
        is_eos |= new_tokens == eos
    # A token is kept if no end-of-sequence token came strictly before it.
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    completion_mask = ~ended_before
    attention_mask = torch.cat([prompt_attention_mask.to(completion_mask.dtype), completion_mask], dim=1).long()
    input_ids = sequences.masked_fill(attention_mask == 0, pad_token_id)
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, prompt_length:] = new_tokens.masked_fill(~completion_mask, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),
        "labels": labels,
    }

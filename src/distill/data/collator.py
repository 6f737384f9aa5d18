"""Rows to padded tensors: :class:`DistillCollator`.

Packed rows get ``attention_mask=None`` and ``position_ids`` that restart at 0 per document; the model
must be called with ``use_cache=False`` (the trainer does). Why: transformers 5.x
(``masking_utils._preprocess_mask_arguments``) splits a row into documents from its ``position_ids``
only when the 2D ``attention_mask`` is None *and* there is no KV cache, and Llama/Qwen2 create an empty
cache whenever ``use_cache`` is on (the config default, in training too). Any 2D mask, even all ones,
turns the detection off and documents silently attend to each other. From the detected documents
transformers builds the mask each attention implementation needs (bool for ``sdpa``, additive in the
model's dtype for ``eager``). A ready 4D mask from here would have to guess that: a float32 one is
refused by CUDA's memory-efficient SDPA kernel for bf16 models (and misread by some cuDNN versions), a
bool one is added as 1/0 by ``eager``. :func:`packed_attention_mask` builds one for callers that
know their model and cannot turn the cache off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distill.data.formatting import DataError
from distill.data.tokenization import IGNORE_INDEX

__all__ = ["NUM_INPUT_TOKENS_KEY", "DistillCollator", "packed_attention_mask"]

# Packed batches carry a 4D mask (or none): the collator counts their non-padding tokens under this key.
NUM_INPUT_TOKENS_KEY = "num_input_tokens"


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Block-diagonal causal mask from ``position_ids`` that restart at 0 per document.

    A document starts wherever the position does not continue the previous one by 1 (the rule of
    transformers' ``find_packed_sequence_indices``), so padding numbered 0, 1, ... is a document of its
    own: every query keeps at least one key, and no row is fully masked (no NaN).

    Args:
        position_ids: [batch, seq] int positions.
        dtype: ``torch.bool`` (True where attending; for ``sdpa``), or the model's float dtype for an
            additive mask (0 where attending, the dtype's minimum elsewhere; for ``eager``).

    Returns:
        [batch, 1, seq, seq]: query ``i`` may attend to key ``j`` iff same document and ``j <= i``.
    """
    seq_len = position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    document = starts.cumsum(dim=1)  # [batch, seq]
    same_document = document[:, :, None] == document[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same_document & causal)[:, None]  # [batch, 1, seq, seq]
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _pad(sequences: list[list[int]], length: int, value: int, left: bool = False) -> torch.Tensor:
    padded = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            values = torch.as_tensor(sequence, dtype=torch.long)
            if left:
                padded[row, length - len(sequence) :] = values
            else:
                padded[row, : len(sequence)] = values
    return padded


@dataclass
class DistillCollator:
    """Pad rows from :func:`~distill.data.prepare_dataset` into a batch.

    Attributes:
        pad_token_id: id written at padded positions of ``input_ids`` and ``prompt_input_ids``.
        pad_to_multiple_of: round both padded lengths up to a multiple of this (tensor-core friendly).

    Example:
        >>> collator = DistillCollator(pad_token_id=tokenizer.pad_token_id)
        >>> batch = collator([rows[0], rows[1]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def _length(self, lengths: list[int]) -> int:
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        """Collate rows; keys other than the ones below are ignored.

        Args:
            rows: dicts with ``input_ids`` and ``labels`` (lists of ints; ``labels`` defaults to the ids),
                optionally ``position_ids`` (packed rows; all rows or none) and ``prompt_input_ids``.

        Returns:
            ``input_ids`` [B, L] right-padded with ``pad_token_id``; ``labels`` [B, L], -100 at padding;
            ``attention_mask`` [B, L] long, 1 real / 0 pad. Packed rows instead: ``attention_mask`` None,
            ``position_ids`` [B, L] with padding numbered 0, 1, ... as a document of its own (call the
            model with ``use_cache=False``; see the module docstring), and ``num_input_tokens``, a 0-d long
            tensor counting the non-padding tokens (the mask that would count them is gone). With
            ``prompt_input_ids``:
            ``prompt_input_ids`` [B, P] left-padded (generation appends at the right) and
            ``prompt_attention_mask`` [B, P].
        """
        if not rows:
            raise DataError("DistillCollator got an empty list of rows.")
        input_ids = [list(row["input_ids"]) for row in rows]
        lengths = [len(ids) for ids in input_ids]
        length = self._length(lengths)
        labels = [list(row["labels"]) if row.get("labels") is not None else list(row["input_ids"]) for row in rows]
        batch: dict[str, torch.Tensor | None] = {
            "input_ids": _pad(input_ids, length, self.pad_token_id),
            "attention_mask": _pad([[1] * n for n in lengths], length, 0),
            "labels": _pad(labels, length, IGNORE_INDEX),
        }
        packed = ["position_ids" in row for row in rows]
        if any(packed):
            if not all(packed):
                raise DataError("DistillCollator got packed and unpacked rows in one batch; pack all or none.")
            position_ids = _pad([list(row["position_ids"]) for row in rows], length, 0)
            for row, n in enumerate(lengths):
                position_ids[row, n:] = torch.arange(length - n)
            batch["position_ids"] = position_ids
            # transformers finds the documents from position_ids only without a 2D mask.
            batch[NUM_INPUT_TOKENS_KEY] = torch.tensor(sum(lengths))
            batch["attention_mask"] = None
        if "prompt_input_ids" in rows[0]:
            prompts = [list(row["prompt_input_ids"]) for row in rows]
            prompt_length = self._length([len(ids) for ids in prompts])
            batch["prompt_input_ids"] = _pad(prompts, prompt_length, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = _pad([[1] * len(ids) for ids in prompts], prompt_length, 0, left=True)
        return batch

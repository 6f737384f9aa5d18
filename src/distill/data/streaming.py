"""Streaming rows (``datasets.IterableDataset``): checked on their first rows, then tokenized as they are read.

A stream has no length and may not fit in memory, so it is never materialised: its first
:data:`STREAM_CHECKED_ROWS` rows go through :func:`~distill.data.prepare_dataset` (layout, chat template, row
problems, the report), and the rest are tokenized lazily by ``IterableDataset.map``, each row checked as it is
read. Packing needs every row at once and is refused.
"""

from __future__ import annotations

import functools
from typing import Any

import datasets

from distill.data.formatting import DataError
from distill.data.prepare import NEED_PROMPTS, DataReport, prepare_dataset
from distill.data.tokenization import bos_prefix, tokenize_batch

# Rows of a stream read and checked before training (also what the report describes).
STREAM_CHECKED_ROWS = 64
_BOOKKEEPING = ("_error", "_prompt_length", "_truncated", "_num_loss_tokens")


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streaming ``datasets.IterableDataset``."""
    return isinstance(dataset, datasets.IterableDataset)


def prepare_stream(
    dataset: datasets.IterableDataset,
    tokenizer: Any,
    *,
    max_length: int,
    completion_only_loss: bool = True,
    packing: bool = False,
    need_prompts: bool = False,
    chat_loss_tokens: str = "assistant_turns",
) -> tuple[datasets.IterableDataset, DataReport]:
    """Check a stream's first rows and return it tokenized lazily, with rows as :func:`prepare_dataset` makes them.

    Args:
        dataset: the streaming rows, in any layout :func:`prepare_dataset` accepts.
        tokenizer, max_length, completion_only_loss, need_prompts, chat_loss_tokens: as in :func:`prepare_dataset`.
        packing: must be False.

    Returns:
        ``(rows, report)``: an ``IterableDataset`` of ``input_ids`` / ``labels`` (and ``prompt_input_ids``) rows,
        and the :class:`DataReport` of the first :data:`STREAM_CHECKED_ROWS` rows (``streamed=True``).

    Raises:
        DataError: packing, an empty stream, or a problem in the first rows (all listed); later, while training
            reads it, a row the trainer cannot use (named by its index in the stream).
    """
    if packing:
        raise DataError(
            "packing=True needs every row at once, and a streaming dataset (IterableDataset) is read as training "
            "goes. Set packing=False, or materialise the rows first: Dataset.from_list(list(stream.take(n)))."
        )
    head = list(dataset.take(STREAM_CHECKED_ROWS))
    if not head:
        raise DataError("The streaming dataset is empty: there is nothing to train on.")
    checked, report = prepare_dataset(
        head, tokenizer, max_length=max_length, completion_only_loss=completion_only_loss, need_prompts=need_prompts,
        chat_loss_tokens=chat_loss_tokens,
    )  # fmt: skip
    report.streamed = True
    tokenize = functools.partial(
        tokenize_batch,
        fmt=report.format,
        tokenizer=tokenizer,
        max_length=max_length,
        completion_only_loss=completion_only_loss,
        chat_loss_tokens=chat_loss_tokens,
        keep_prompts="prompt_input_ids" in checked.column_names,
        bos=bos_prefix(tokenizer) if report.format != "tokenized" else [],
    )
    work = functools.partial(_tokenize_and_check, tokenize=tokenize, max_length=max_length, need_prompts=need_prompts)
    return dataset.map(work, batched=True, with_indices=True, remove_columns=list(head[0])), report


def _tokenize_and_check(
    batch: dict[str, list[Any]], indices: list[int], *, tokenize: Any, max_length: int, need_prompts: bool
) -> dict[str, list[Any]]:
    """Tokenize one batch of streamed rows; raise on the first row the trainer cannot use (as prepare_dataset)."""
    out = tokenize(batch)
    for k, index in enumerate(indices):
        prompt_length = out["_prompt_length"][k]
        if need_prompts:
            prompt_length = max(prompt_length, len(out["prompt_input_ids"][k]))
        problem = out["_error"][k]
        if not problem and prompt_length >= max_length:
            problem = f"the prompt alone is {prompt_length:,} tokens, at least max_length={max_length:,}"
        if not problem and not out["_num_loss_tokens"][k]:
            problem = "no token carries loss (every label after the first is -100)"
        if problem:
            raise DataError(
                f"Streamed row {index}: {problem}. Rows of a stream are checked as they are read (the first "
                f"{STREAM_CHECKED_ROWS} before training); filter the stream (stream.filter(...)) or fix the row."
            )
    for name in _BOOKKEEPING:
        del out[name]
    return out


__all__ = ["NEED_PROMPTS", "STREAM_CHECKED_ROWS", "is_stream", "prepare_stream"]

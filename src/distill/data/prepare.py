"""Dataset in, training rows out: :func:`prepare_dataset` checks, tokenizes, truncates and optionally packs."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import datasets

from distill.data.formatting import DataError, detect_format
from distill.data.packing import pack_dataset
from distill.data.tokenization import bos_prefix, tokenize_batch

__all__ = ["DataReport", "as_dataset", "prepare_dataset"]

_ROWS_SHOWN = 5
_BOOKKEEPING = ("_error", "_prompt_length", "_truncated", "_num_loss_tokens")
NEED_PROMPTS = (
    "on-policy distillation (lmbda>0) and seq_kd need prompts: "
    "use messages or prompt/completion rows, and packing=False"
)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclass
class DataReport:
    """What :func:`prepare_dataset` made of a dataset, for the training log.

    Attributes:
        num_rows: rows in (documents, before packing).
        num_truncated: rows longer than ``max_length``, cut at the right.
        num_tokens: tokens kept, after truncation.
        num_loss_tokens: tokens the loss is computed on: labels other than -100, not counting each row's
            first label, which no position predicts once the trainer shifts the labels.
        max_length: the ``max_length`` used.
        format: the row layout, from :func:`detect_format`.
        num_packed_rows: rows after packing, or None without packing.
        streamed: the rows are a stream's first rows, checked before training (the rest are read as it goes).
    """

    num_rows: int
    num_truncated: int
    num_tokens: int
    num_loss_tokens: int
    max_length: int
    format: str
    num_packed_rows: int | None = None
    streamed: bool = False

    def __str__(self) -> str:
        line = "streaming; its first " if self.streamed else ""
        line += (
            f"{_plural(self.num_rows, 'row')} ({self.format}), {self.num_truncated:,} truncated to "
            f"{self.max_length:,} tokens, {_plural(self.num_tokens, 'token')} of which {self.num_loss_tokens:,} "
            "carry loss"
        )
        if self.num_packed_rows is not None:
            line += f", packed into {_plural(self.num_packed_rows, 'row')}"
        return line


def _rows_text(indices: list[int], details: list[str] | None = None) -> str:
    """``"2 rows (index 3, 7)"``, or with details ``"2 rows (index 3: 80 tokens, 7: 95 tokens)"``; first few only."""
    shown = [f"{index}: {details[k]}" if details else str(index) for k, index in enumerate(indices[:_ROWS_SHOWN])]
    more = f" and {len(indices) - _ROWS_SHOWN:,} more" if len(indices) > _ROWS_SHOWN else ""
    return f"{_plural(len(indices), 'row')} (index {', '.join(shown)}{more})"


def _check_columns(dataset: datasets.Dataset, fmt: str, tokenizer: Any, packing: bool, need_prompts: bool) -> bool:
    """Raise on problems visible before tokenizing; return whether the rows have prompts."""
    if len(dataset) == 0:
        raise DataError("The dataset is empty: there is nothing to train on.")
    has_prompts = fmt in ("messages", "prompt_completion") or "prompt_input_ids" in dataset.column_names
    if need_prompts and (packing or not has_prompts):
        found = "packing=True" if packing else f"`{fmt}` rows, which have no prompts"
        raise DataError(f"{NEED_PROMPTS} (got {found}).")
    is_chat = fmt == "messages" or (
        fmt == "prompt_completion" and not isinstance(dataset.features["prompt"], datasets.Value)
    )
    if is_chat and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The rows are chat messages but the tokenizer has no `chat_template`. Use the chat (instruct) model's "
            "tokenizer, or set one: `tokenizer.chat_template = other_tokenizer.chat_template`."
        )
    if fmt != "tokenized" and not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "Text rows need a fast tokenizer (for character offsets, to find the completion tokens): load it "
            "with `AutoTokenizer.from_pretrained(name, use_fast=True)`, or pass pre-tokenized rows."
        )
    return has_prompts


def _check_rows(dataset: datasets.Dataset, max_length: int, need_prompts: bool) -> None:
    """Collect every row problem of the tokenized dataset into one DataError."""
    errors = list(dataset["_error"])
    prompt_lengths = list(dataset["_prompt_length"])
    if need_prompts:
        # Generation starts from prompt_input_ids, so that prompt must leave room for a token too.
        generation_lengths = [len(ids) for ids in dataset["prompt_input_ids"]]
        prompt_lengths = [max(pair) for pair in zip(prompt_lengths, generation_lengths, strict=True)]
    num_loss = list(dataset["_num_loss_tokens"])
    problems: list[str] = []
    by_message: dict[str, list[int]] = {}
    for index, error in enumerate(errors):
        if error:
            by_message.setdefault(error, []).append(index)
    problems += [f"{_rows_text(indices)}: {message}." for message, indices in by_message.items()]
    too_long = [i for i, length in enumerate(prompt_lengths) if not errors[i] and length >= max_length]
    if too_long:
        details = [f"{prompt_lengths[i]:,} tokens" for i in too_long]
        problems.append(
            f"{_rows_text(too_long, details)}: the prompt alone is at least max_length={max_length:,} tokens, leaving "
            "no room for a completion token; raise max_length, or filter out rows with long prompts."
        )
    no_loss = [i for i, count in enumerate(num_loss) if not errors[i] and prompt_lengths[i] < max_length and not count]
    if no_loss:
        problems.append(
            f"{_rows_text(no_loss)}: no token carries loss (every label after the first is -100); "
            "drop these rows or give them a completion."
        )
    if problems:
        raise DataError("The dataset has rows the trainer cannot use:\n- " + "\n- ".join(problems))


def as_dataset(rows: Any) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a Dataset (returned as is) or a list / tuple of row dicts.

    Raises:
        DataError: anything else (a ``DatasetDict``: pick a split; a list of non-dicts; ...).
    """
    if isinstance(rows, datasets.Dataset):
        return rows
    if isinstance(rows, datasets.DatasetDict):
        raise DataError(f"Got a DatasetDict with splits {sorted(rows)}: pass one split, e.g. dataset['train'].")
    if isinstance(rows, (list, tuple)):
        bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
        if bad:
            raise DataError(
                f"The rows must be dicts (e.g. {{'messages': [...]}} or {{'text': '...'}}); row {bad[0]} is a "
                f"{type(rows[bad[0]]).__name__}."
            )
        if not rows:
            raise DataError("The dataset is empty: there is nothing to train on.")
        try:
            return datasets.Dataset.from_list(list(rows))
        except (TypeError, ValueError) as error:  # pyarrow cannot type a column (e.g. mixed types)
            raise DataError(f"The rows cannot be made into a dataset (a column mixes types?): {error}") from None
    raise DataError(f"A dataset must be a datasets.Dataset or a list of row dicts; got {type(rows).__name__}.")


def prepare_dataset(
    dataset: datasets.Dataset | list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    completion_only_loss: bool = True,
    packing: bool = False,
    need_prompts: bool = False,
    num_proc: int | None = None,
    chat_loss_tokens: str = "assistant_turns",
) -> tuple[datasets.Dataset, DataReport]:
    """Check, tokenize, truncate and optionally pack a dataset for the distillation trainer.

    Accepts the layouts of :func:`detect_format` (see ``docs/data.md``); extra columns are dropped.

    Args:
        dataset: the rows: a ``datasets.Dataset`` or a list of row dicts.
        tokenizer: the student's tokenizer (fast, with a ``chat_template`` for chat rows).
        max_length: longest row in tokens; longer rows are cut at the right and counted in the report.
        completion_only_loss: loss on the completion (assistant turns, or the ``completion`` string) only;
            False puts loss on every token. ``text`` rows always have loss on every token.
        packing: pack several rows into each row of at most ``max_length`` tokens (adds ``position_ids``).
        need_prompts: the trainer generates from prompts (on-policy or sequence-level KD): require them.
        num_proc: processes for ``dataset.map``.
        chat_loss_tokens: which tokens of a chat carry loss: ``"assistant_turns"`` (every assistant turn's content
            and end-of-turn token) or ``"trl"`` (TRL's: the last turn through the end of the render).

    Returns:
        ``(rows, report)``. ``rows`` has lists of ints ``input_ids`` and ``labels`` (same length, unshifted,
        -100 where no loss), ``prompt_input_ids`` when the layout has prompts and ``packing`` is False, and
        ``position_ids`` when packing.

    Raises:
        DataError: unusable data: unknown columns, empty completions, prompts of ``max_length`` tokens or more,
            rows without loss tokens, a missing chat template, or prompts needed but absent. All row problems
            are reported at once, with row indices.
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length} is too small: a row needs at least 2 tokens to carry loss.")
    dataset = as_dataset(dataset)
    fmt = detect_format(dataset.column_names)
    has_prompts = _check_columns(dataset, fmt, tokenizer, packing, need_prompts)
    tokenize = functools.partial(
        tokenize_batch,
        fmt=fmt,
        tokenizer=tokenizer,
        max_length=max_length,
        completion_only_loss=completion_only_loss,
        chat_loss_tokens=chat_loss_tokens,
        keep_prompts=has_prompts,
        bos=bos_prefix(tokenizer) if fmt != "tokenized" else [],
    )
    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing"
    )
    _check_rows(tokenized, max_length, need_prompts)
    report = DataReport(
        num_rows=len(tokenized),
        num_truncated=sum(tokenized["_truncated"]),
        num_tokens=sum(len(ids) for ids in tokenized["input_ids"]),
        num_loss_tokens=sum(tokenized["_num_loss_tokens"]),
        max_length=max_length,
        format=fmt,
    )
    tokenized = tokenized.remove_columns(list(_BOOKKEEPING))
    if packing:
        tokenized = pack_dataset(tokenized, max_length)
        report.num_packed_rows = len(tokenized)
    return tokenized, report

"""Text to token ids and labels: the batched ``dataset.map`` function behind :func:`distill.data.prepare_dataset`.

Row problems do not raise here: a map may run in worker processes, where an exception loses the row
index. Each row instead returns its problem in an ``_error`` column (empty when fine), which the main
process turns into one :class:`~distill.data.DataError` naming the rows.
"""

from __future__ import annotations

from typing import Any

from distill.data.formatting import FormattedRow, RowError, format_row

__all__ = ["IGNORE_INDEX", "bos_prefix", "tokenize_batch"]

IGNORE_INDEX = -100

# One row: its token ids, per token whether it belongs to the completion, and its prompt ids (or None).
_Tokens = tuple[list[int], list[bool], "list[int] | None"]

# Problems of pre-tokenized rows.
EMPTY_INPUT_IDS = "`input_ids` is empty or not a list of token ids"
LENGTH_MISMATCH = "`labels` and `input_ids` have different lengths"
OUT_OF_VOCAB = (
    "a token id is outside the tokenizer's vocabulary [0, len(tokenizer)); was it made by another tokenizer?"
)
SHIFTED_LABELS = (
    "a label is neither -100 nor the token id at its position; labels must be unshifted "
    "(labels[i] == input_ids[i] where the token carries loss, -100 elsewhere): the trainer shifts them"
)
BAD_PROMPT_IDS = "`prompt_input_ids` is empty or has ids outside the tokenizer's vocabulary"


def bos_prefix(tokenizer: Any) -> list[int]:
    """The bos id the tokenizer puts in front of plain text (``[]`` if it adds none), found by trying it.

    Llama-style tokenizers add ``<s>``/``<|begin_of_text|>`` when called with ``add_special_tokens=True``;
    Qwen-style ones add nothing. Plain rows are tokenized without special tokens and get this prefix, so
    they start the way the model saw text in pre-training.
    """
    bos_id = tokenizer.bos_token_id
    if tokenizer.bos_token is None or bos_id is None:
        return []
    with_special = tokenizer("x")["input_ids"]
    without_special = tokenizer("x", add_special_tokens=False)["input_ids"]
    return [bos_id] if with_special[:1] == [bos_id] and without_special[:1] != [bos_id] else []


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    # A token carries loss if any of its characters does, so a token straddling the prompt/completion
    # boundary (BPE merges across it) belongs to the completion: the model has to produce it.
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def _row_from_text(
    formatted: FormattedRow, ids: list[int], offsets: list[tuple[int, int]], tokenizer: Any, bos: list[int]
) -> tuple[list[int], list[bool]]:
    """Token ids of one formatted row and, per token, whether it belongs to the completion."""
    in_completion = [_overlaps(offset, formatted.completion_spans) for offset in offsets]
    if formatted.plain:
        if bos and ids[:1] != bos:
            ids, in_completion = bos + ids, [False] + in_completion
        eos_token, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        # The eos id is appended, not its text, so a tokenizer that splits special tokens in text cannot undo it.
        if eos_id is not None and not (eos_token and formatted.text.endswith(eos_token)):
            ids, in_completion = ids + [eos_id], in_completion + [True]
    return ids, in_completion


def _check_tokenized(row: dict[str, Any], vocab_size: int) -> _Tokens:
    """Validate one pre-tokenized row; its completion is where the labels (the ids if absent) are not -100."""
    ids = row["input_ids"]
    if not isinstance(ids, list) or not ids:
        raise RowError(EMPTY_INPUT_IDS)
    labels = row.get("labels")
    labels = list(ids) if labels is None else labels
    if len(labels) != len(ids):
        raise RowError(LENGTH_MISMATCH)
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise RowError(OUT_OF_VOCAB)
    if any(label != IGNORE_INDEX and label != token for label, token in zip(labels, ids, strict=True)):
        raise RowError(SHIFTED_LABELS)
    prompt_ids = row.get("prompt_input_ids")
    if "prompt_input_ids" in row and (not prompt_ids or min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size):
        raise RowError(BAD_PROMPT_IDS)
    return ids, [label != IGNORE_INDEX for label in labels], prompt_ids


def _tokenized_rows(batch: dict[str, list[Any]], vocab_size: int) -> tuple[list[_Tokens | None], list[str]]:
    num_rows = len(next(iter(batch.values())))
    results: list[_Tokens | None] = []
    errors = []
    for index in range(num_rows):
        try:
            results.append(_check_tokenized({name: values[index] for name, values in batch.items()}, vocab_size))
            errors.append("")
        except RowError as error:
            results.append(None)
            errors.append(str(error))
    return results, errors


def _encode(tokenizer: Any, texts: list[str], offsets: bool = False) -> dict[str, list[Any]]:
    if not texts:  # transformers fails on an empty list
        return {"input_ids": [], "offset_mapping": []}
    # One call per batch: the fast tokenizer encodes the list in parallel in Rust. verbose=False: rows longer
    # than model_max_length are expected here (they are truncated, and counted, afterwards).
    return tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False, verbose=False
    )


def _tokenize_texts(
    batch: dict[str, list[Any]], fmt: str, tokenizer: Any, bos: list[int], chat_loss_tokens: str
) -> tuple[list[_Tokens | None], list[str]]:
    """Format and tokenize a batch of text rows: per row its :data:`_Tokens` (None on a problem), and its problem."""
    num_rows = len(next(iter(batch.values())))
    formatted: list[FormattedRow | None] = []
    errors = []
    for index in range(num_rows):
        try:
            row = {name: values[index] for name, values in batch.items()}
            formatted.append(format_row(row, fmt, tokenizer, chat_loss_tokens))
            errors.append("")
        except RowError as error:
            formatted.append(None)
            errors.append(str(error))
    good = [row for row in formatted if row is not None]
    encoded = _encode(tokenizer, [row.text for row in good], offsets=True)
    prompts = [row.prompt_text for row in good if row.prompt_text is not None]
    prompt_ids = iter(_encode(tokenizer, prompts)["input_ids"])
    results: list[_Tokens | None] = []
    position = 0
    for row in formatted:
        if row is None:
            results.append(None)
            continue
        ids, offsets = encoded["input_ids"][position], encoded["offset_mapping"][position]
        position += 1
        ids, in_completion = _row_from_text(row, ids, offsets, tokenizer, bos)
        prompt = None
        if row.prompt_text is not None:
            prompt = (bos if row.plain else []) + next(prompt_ids)
        results.append((ids, in_completion, prompt))
    return results, errors


def tokenize_batch(
    batch: dict[str, list[Any]],
    *,
    fmt: str,
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool,
    keep_prompts: bool,
    bos: list[int],
    chat_loss_tokens: str = "assistant_turns",
) -> dict[str, list[Any]]:
    """Tokenize a batch of rows of one layout into ids, unshifted labels and prompt ids, truncated to ``max_length``.

    Args:
        batch: columns of the batch, as ``dataset.map(batched=True)`` passes them.
        fmt: the layout, from :func:`~distill.data.detect_format`.
        tokenizer: a fast tokenizer (offsets are needed), with a chat template for chat rows.
        max_length: longest row kept, in tokens; longer rows are cut at the right.
        completion_only_loss: loss on completion/assistant tokens only; else on every token.
        keep_prompts: also return ``prompt_input_ids``.
        bos: :func:`bos_prefix` of the tokenizer.
        chat_loss_tokens: which tokens of a chat render carry loss (:data:`~distill.data.formatting.CHAT_LOSS_TOKENS`).

    Returns:
        Columns ``input_ids``, ``labels`` (``-100`` where no loss), optionally ``prompt_input_ids``, and the
        bookkeeping columns ``_error`` (the row's problem, or ``""``), ``_prompt_length`` (tokens before the
        first completion token, before truncation), ``_truncated`` and ``_num_loss_tokens`` (labels at
        positions 1.. that are not -100: the ones a shifted loss uses).
    """
    columns = ["input_ids", "labels", "_error", "_prompt_length", "_truncated", "_num_loss_tokens"]
    out: dict[str, list[Any]] = {name: [] for name in columns + (["prompt_input_ids"] if keep_prompts else [])}
    if fmt == "tokenized":
        results, errors = _tokenized_rows(batch, len(tokenizer))
    else:
        results, errors = _tokenize_texts(batch, fmt, tokenizer, bos, chat_loss_tokens)
    for result, error in zip(results, errors, strict=True):
        ids, in_completion, prompt = result if result is not None else ([], [], [])
        carries_loss = in_completion if completion_only_loss and fmt != "text" else [True] * len(ids)
        labels = [token if loss else IGNORE_INDEX for token, loss in zip(ids, carries_loss, strict=True)]
        out["_prompt_length"].append(next((i for i, flag in enumerate(in_completion) if flag), len(ids)))
        out["_truncated"].append(len(ids) > max_length)
        out["input_ids"].append(ids[:max_length])
        out["labels"].append(labels[:max_length])
        out["_num_loss_tokens"].append(sum(label != IGNORE_INDEX for label in labels[1:max_length]))
        out["_error"].append(error)
        if keep_prompts:
            out["prompt_input_ids"].append(prompt or [])
    return out

"""Rows to text: which layout a dataset has, and which characters of each rendered row carry loss.

Every layout is turned into one :class:`FormattedRow`: the full text to tokenize once, the character
spans of the completion (assistant turns, or the completion string), and the prompt to generate from.
Tokens are mapped back to these spans by their character offsets in :mod:`distill.data.tokenization`,
so a chat template never has to be tokenized piece by piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distill.checks import InputError

__all__ = ["CHAT_LOSS_TOKENS", "FORMATS", "DataError", "FormattedRow", "RowError", "detect_format", "format_row"]

FORMATS = ("messages", "prompt_completion", "text", "tokenized")
# Which tokens of a chat render carry loss: every assistant turn's content and end-of-turn token (ours), or
# TRL's DataCollatorForChatML convention: the last message, from the generation prompt to the end of the render
# (the newline the template writes after the end-of-turn token included; earlier assistant turns are prompt).
CHAT_LOSS_TOKENS = ("assistant_turns", "trl")

_LAYOUTS = (
    "`messages` (a list of {'role', 'content'} dicts), "
    "`prompt` + `completion` (strings, or lists of chat messages), "
    "`text` (a string), "
    "or `input_ids` (token ids, optional `labels` and `prompt_input_ids`)"
)


class DataError(InputError):
    """A dataset the distillation trainer cannot use; the message says what, which rows and how to fix it."""


class RowError(Exception):
    """One row's problem, raised inside the tokenization map and collected into a :class:`DataError`.

    The message is the same for every row with this problem (no index in it), so rows can be grouped.
    """


# Problems found in single rows. Each reads after "rows 3, 7 (2 rows): " and says how to fix it.
MESSAGES_NOT_LIST = "`messages` is not a non-empty list of chat messages"
MESSAGE_MALFORMED = (
    "a message is not a dict with string 'role' and 'content'; tool-call turns without text content are not supported"
)
NO_ASSISTANT = "there is no assistant turn, so no token would carry loss; drop these rows or add the answer"
EMPTY_ASSISTANT = "an assistant turn has empty or whitespace-only content; drop these rows or fill in the answer"
STARTS_WITH_ASSISTANT = (
    "the conversation starts with an assistant turn, which has no prompt to condition on; "
    "put a system or user message before it"
)
NOT_PREFIX_STABLE = (
    "the chat template is not prefix-stable: rendering the first turns of the conversation is not a prefix of "
    "rendering all of it (templates that rewrite earlier turns, e.g. strip past reasoning, do this), so the "
    "assistant tokens cannot be located; use a template that renders earlier turns unchanged"
)
EMPTY_COMPLETION = "the completion is empty or whitespace-only; drop these rows or fill in the completion"
EMPTY_PROMPT = "the prompt is an empty list of messages; give every row at least one prompt message"
MIXED_PROMPT_COMPLETION = "`prompt` and `completion` must both be strings or both be lists of chat messages"
EMPTY_TEXT = "the text is empty or whitespace-only; drop these rows"


def not_text(column: str, value: Any) -> str:
    """The problem of a ``column`` value that is not a string (same message for every row of that type)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return f"`{column}` is bytes that are not valid UTF-8, not text; decode it with its real encoding first"
        return f"`{column}` is bytes, not text; decode it first (value.decode('utf-8'))"
    return f"`{column}` is a {type(value).__name__}, not text; convert these rows to strings or drop them"


def detect_format(column_names: Sequence[str]) -> str:
    """Name the row layout of a dataset from its columns.

    Pre-tokenized data wins when several layouts are present (``input_ids`` next to ``messages`` means
    the rows were already processed), then ``messages``, ``prompt``/``completion`` and ``text``.
    Other columns are allowed and dropped.

    Args:
        column_names: the dataset's column names.

    Returns:
        One of ``"tokenized"``, ``"messages"``, ``"prompt_completion"``, ``"text"``.

    Raises:
        DataError: no accepted layout; the message lists the columns found and the accepted layouts.
    """
    columns = set(column_names)
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    hint = ""
    if "prompt" in columns:
        hint = " A `prompt` column needs a `completion` column beside it (the teacher's or reference answer)."
    raise DataError(f"No known row layout in columns {sorted(columns)}. Accepted layouts: {_LAYOUTS}.{hint}")


@dataclass
class FormattedRow:
    """One row as text, before tokenization.

    Attributes:
        text: the full text to tokenize (chat rows: the template's render, special tokens included).
        completion_spans: ``[start, end)`` character spans of ``text`` that carry loss with
            ``completion_only_loss``: each assistant turn's content and end-of-turn token, or the
            completion string.
        prompt_text: the text to generate a completion from (chat: rendered with the generation
            prompt), or None for a format without prompts.
        plain: True for plain strings, which get the tokenizer's bos in front and eos after the completion;
            chat renders carry their own special tokens.
    """

    text: str
    completion_spans: list[tuple[int, int]]
    prompt_text: str | None
    plain: bool


def _clean_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(MESSAGES_NOT_LIST)
    cleaned = []
    for message in messages:
        if not isinstance(message, dict):
            raise RowError(MESSAGE_MALFORMED)
        # Arrow gives every message of a column the union of all keys, None where absent; a template
        # testing `message.name is defined` must not see those.
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise RowError(MESSAGE_MALFORMED)
        cleaned.append(message)
    return cleaned


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # any template error is this row's problem, reported with the others
        raise RowError(f"the chat template failed on this conversation: {type(error).__name__}: {error}") from None


def _format_chat(
    tokenizer: Any, messages: list[dict[str, Any]], first_completion_turn: int, loss_tokens: str = "assistant_turns"
) -> FormattedRow:
    """Render a conversation; assistant turns from ``first_completion_turn`` on carry loss.

    An assistant turn spans from the end of ``render(messages[:i], add_generation_prompt=True)`` (so the
    ``<|im_start|>assistant\\n`` header is prompt) to the end of ``render(messages[:i + 1])`` with trailing
    whitespace dropped (so ``<|im_end|>`` carries loss but the newline the template writes after it, which
    the model never generates, does not). ``loss_tokens="trl"``: only the last turn (or, for prompt/completion
    rows, the completion), and through the end of the render, trailing newline included, as TRL's
    ``DataCollatorForChatML`` labels it.
    """
    if loss_tokens == "trl":
        return _format_chat_trl(tokenizer, messages, first_completion_turn)
    turns = [i for i in range(first_completion_turn, len(messages)) if messages[i]["role"] == "assistant"]
    if not turns:
        raise RowError(NO_ASSISTANT)
    if turns[0] == 0:
        raise RowError(STARTS_WITH_ASSISTANT)
    if any(not messages[i]["content"].strip() for i in turns):
        raise RowError(EMPTY_ASSISTANT)
    text = _render(tokenizer, messages)
    spans = []
    prompt_text = ""
    for i in turns:
        prompt_text = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through_turn = _render(tokenizer, messages[: i + 1]).rstrip()
        if not (text.startswith(prompt_text) and text.startswith(through_turn)) or len(through_turn) <= len(
            prompt_text
        ):
            raise RowError(NOT_PREFIX_STABLE)
        spans.append((len(prompt_text), len(through_turn)))
    if first_completion_turn > 0:
        # Prompt/completion rows generate from the whole prompt, whatever the completion holds.
        prompt_text = _render(tokenizer, messages[:first_completion_turn], add_generation_prompt=True)
    return FormattedRow(text=text, completion_spans=spans, prompt_text=prompt_text, plain=False)


def _format_chat_trl(tokenizer: Any, messages: list[dict[str, Any]], first_completion_turn: int) -> FormattedRow:
    """TRL's convention: loss from the end of the prompt's render (generation prompt included) to the end."""
    start = first_completion_turn or len(messages) - 1  # messages rows: the last message is the completion
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "assistant" for m in messages[start:]):
        raise RowError(NO_ASSISTANT)
    if start == 0:
        raise RowError(STARTS_WITH_ASSISTANT)
    if any(not m["content"].strip() for m in messages[start:] if m["role"] == "assistant"):
        raise RowError(EMPTY_ASSISTANT)
    text = _render(tokenizer, messages)
    prompt_text = _render(tokenizer, messages[:start], add_generation_prompt=True)
    if not text.startswith(prompt_text) or len(text.rstrip()) <= len(prompt_text):
        raise RowError(NOT_PREFIX_STABLE)
    return FormattedRow(
        text=text, completion_spans=[(len(prompt_text), len(text))], prompt_text=prompt_text, plain=False
    )


def format_row(
    row: dict[str, Any], fmt: str, tokenizer: Any, chat_loss_tokens: str = "assistant_turns"
) -> FormattedRow:
    """Turn one row of a ``messages``, ``prompt_completion`` or ``text`` dataset into text and loss spans.

    Args:
        row: the dataset row.
        fmt: its layout, from :func:`detect_format` (not ``"tokenized"``).
        tokenizer: a tokenizer with a ``chat_template`` when the rows are chats.
        chat_loss_tokens: which tokens of a chat render carry loss, one of :data:`CHAT_LOSS_TOKENS`
            (``"assistant_turns"``: every assistant turn's content and end-of-turn token; ``"trl"``: TRL's).

    Returns:
        The :class:`FormattedRow`.

    Raises:
        RowError: the row cannot be used; the message names the problem and the fix.
    """
    if fmt == "messages":
        return _format_chat(tokenizer, _clean_messages(row["messages"]), 0, chat_loss_tokens)
    if fmt == "text":
        text = row["text"]
        if text is not None and not isinstance(text, str):
            raise RowError(not_text("text", text))
        if not isinstance(text, str) or not text.strip():
            raise RowError(EMPTY_TEXT)
        return FormattedRow(text=text, completion_spans=[(0, len(text))], prompt_text=None, plain=True)
    prompt, completion = row["prompt"], row["completion"]
    for column, value in (("prompt", prompt), ("completion", completion)):
        if value is not None and not isinstance(value, (str, list)):
            raise RowError(not_text(column, value))
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RowError(EMPTY_COMPLETION)
        return FormattedRow(
            text=prompt + completion,
            completion_spans=[(len(prompt), len(prompt) + len(completion))],
            prompt_text=prompt,
            plain=True,
        )
    if isinstance(prompt, list) and isinstance(completion, list):
        if not prompt:
            raise RowError(EMPTY_PROMPT)
        if not completion:
            raise RowError(NO_ASSISTANT)
        messages = _clean_messages(prompt + completion)
        return _format_chat(tokenizer, messages, len(prompt), chat_loss_tokens)
    raise RowError(MIXED_PROMPT_COMPLETION)

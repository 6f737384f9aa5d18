"""Alignment of two tokenizations of the same text: which student tokens and teacher tokens cover the same bytes.

Cross-tokenizer distillation compares a student and a teacher that cut the text differently. Both
tokenizations are turned into byte offsets (every token knows the UTF-8 bytes it stands for, see
:func:`token_byte_table`), and the text is cut into *spans* at the byte positions where both sides
have a token boundary: a span is a group of consecutive student tokens and a group of consecutive
teacher tokens covering exactly the same bytes. At the first token of a span both models have read
the same text, so their next-token distributions describe the same event and can be compared (see
:mod:`distill.losses.cross_vocab`).

Two paths, one result:

* Fast path: the two byte strings are equal (the usual case when both sides tokenize the same
  completion text): the boundaries are the byte positions both sides end a token at, found by one
  merge-like walk, ``O(n + m)``.
* General path: the byte strings differ (a SentencePiece dummy space, a chat template's end-of-turn
  text on one side only, a token straddling the prompt boundary, a normaliser): the common prefix and
  suffix are matched directly and the differing middle by a dynamic programme over bytes (edit
  distance with backtracking, capped in size); a span is kept only where its bytes are equal on both
  sides, so text that only one side has is left unaligned.

Special tokens (BOS, EOS, end-of-turn markers) cover no bytes. Those that sit at the same text
position on both sides (typically the final EOS) form a span of their own; a special token only one
side has (a BOS the teacher's template adds, say) is left unaligned. Nothing here imports a model:
the tokenizer is only asked for its vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "SpanAlignment",
    "align_offsets",
    "align_token_ids",
    "byte_offsets",
    "char_to_byte_offsets",
    "special_token_ids",
    "token_byte_table",
]

# Edit-distance cells the general path may spend on the differing middle of one pair of texts.
_MAX_DP_CELLS = 250_000


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: ``{char: byte}``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    """Types of the fast tokenizer's decoder steps (``ByteLevel``, ``Metaspace``, ``ByteFallback``, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {step.get("type", "") for step in steps if step}


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (bos, eos, pad, chat markers...): they stand for no text."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def token_byte_table(tokenizer: Any) -> list[bytes]:
    """The UTF-8 bytes each token id stands for, ``b""`` for special tokens; index = token id.

    Byte-level BPE tokens (GPT-2, Llama 3, Qwen, SmolLM) are decoded through the byte alphabet, so a
    token holding half of a multibyte character gets exactly its bytes. SentencePiece-style tokens get
    ``▁`` as a space and ``<0xNN>`` byte-fallback pieces as that byte. Other tokenizers fall back to
    ``convert_tokens_to_string`` one token at a time.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast ones are read from their ``tokenizer.json``).

    Returns:
        ``len(tokenizer)`` byte strings.
    """
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = special_token_ids(tokenizer)
    added = {int(i): t for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    kinds = _decoder_types(tokenizer)
    byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None
    table: list[bytes] = []
    for token_id, token in enumerate(tokens):
        if token is None or token_id in special:
            table.append(b"")
        elif token_id in added:
            table.append(str(added[token_id]).encode())
        elif byte_level is not None and all(char in byte_level for char in token):
            table.append(bytes(byte_level[char] for char in token))
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            table.append(bytes([int(token[3:5], 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds or "▁" in token:
            table.append(token.replace("▁", " ").encode())
        else:
            table.append(tokenizer.convert_tokens_to_string([token]).encode())
    return table


def byte_offsets(ids: list[int], table: list[bytes]) -> tuple[list[int], bytes]:
    """End byte offset of each token in the concatenation of the tokens' bytes, and that concatenation.

    Args:
        ids: ``[n]`` token ids.
        table: :func:`token_byte_table` of their tokenizer.

    Returns:
        ``(ends, text)``: ``ends[i]`` is where token ``i`` ends in ``text`` (special tokens end where
        they start), ``text`` the bytes the ids stand for.
    """
    ends, parts, position = [], [], 0
    for token_id in ids:
        piece = table[token_id] if 0 <= token_id < len(table) else b""
        parts.append(piece)
        position += len(piece)
        ends.append(position)
    return ends, b"".join(parts)


def char_to_byte_offsets(text: str, char_offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character offsets (a fast tokenizer's ``offset_mapping``) as UTF-8 byte offsets into ``text``."""
    prefix = [0]
    for char in text:
        prefix.append(prefix[-1] + len(char.encode()))
    return [(prefix[start], prefix[end]) for start, end in char_offsets]


@dataclass
class SpanAlignment:
    """Spans of tokens covering the same text on both sides, as half-open token-index ranges.

    Attributes:
        student_starts, student_ends: ``[J]`` span ``j`` holds student tokens
            ``student_starts[j] .. student_ends[j] - 1``.
        teacher_starts, teacher_ends: ``[J]`` the same for the teacher's tokens.
        special: ``[J]`` the span holds special tokens only (e.g. both sides' EOS).
        student_unaligned, teacher_unaligned: tokens (indices) that are in no span: text or special
            tokens only one side has.
    """

    student_starts: list[int] = field(default_factory=list)
    student_ends: list[int] = field(default_factory=list)
    teacher_starts: list[int] = field(default_factory=list)
    teacher_ends: list[int] = field(default_factory=list)
    special: list[bool] = field(default_factory=list)
    student_unaligned: list[int] = field(default_factory=list)
    teacher_unaligned: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.student_starts)

    def add(self, student: tuple[int, int], teacher: tuple[int, int], special: bool = False) -> None:
        """Append a span of student tokens ``student[0]:student[1]`` and teacher tokens ``teacher[0]:teacher[1]``."""
        self.student_starts.append(student[0])
        self.student_ends.append(student[1])
        self.teacher_starts.append(teacher[0])
        self.teacher_ends.append(teacher[1])
        self.special.append(special)

    @property
    def one_to_one(self) -> list[bool]:
        """``[J]`` the span is one token on each side."""
        return [
            s_end - s_start == 1 and t_end - t_start == 1
            for s_start, s_end, t_start, t_end in zip(
                self.student_starts, self.student_ends, self.teacher_starts, self.teacher_ends, strict=True
            )
        ]


def _position_map(student_text: bytes, teacher_text: bytes) -> list[int]:
    """For each teacher byte position ``0..len(teacher_text)``, the student position of the same text, or -1.

    Equal texts map identically (fast path). Otherwise the common prefix and suffix map directly, and
    the middle by an edit-distance alignment (only positions reached by a run of equal bytes map);
    a middle larger than ``_MAX_DP_CELLS`` cells stays unmapped.
    """
    n_s, n_t = len(student_text), len(teacher_text)
    if student_text == teacher_text:
        return list(range(n_t + 1))
    mapping = [-1] * (n_t + 1)
    prefix = 0
    while prefix < min(n_s, n_t) and student_text[prefix] == teacher_text[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n_s, n_t) - prefix and student_text[n_s - 1 - suffix] == teacher_text[n_t - 1 - suffix]:
        suffix += 1
    for position in range(prefix + 1):
        mapping[position] = position
    for back in range(suffix + 1):
        mapping[n_t - back] = n_s - back
    middle_s = student_text[prefix : n_s - suffix]
    middle_t = teacher_text[prefix : n_t - suffix]
    if middle_s and middle_t and len(middle_s) * len(middle_t) <= _MAX_DP_CELLS:
        for s_pos, t_pos in _matched_positions(middle_s, middle_t):
            mapping[prefix + t_pos] = prefix + s_pos
    return mapping


def _matched_positions(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Position pairs ``(i, j)`` after equal bytes ``a[i-1] == b[j-1]`` on a minimal edit path of ``a`` to ``b``."""
    rows, cols = len(a) + 1, len(b) + 1
    cost = [list(range(cols))] + [[i] + [0] * (cols - 1) for i in range(1, rows)]
    for i in range(1, rows):
        above, here, byte = cost[i - 1], cost[i], a[i - 1]
        for j in range(1, cols):
            diagonal = above[j - 1] + (0 if byte == b[j - 1] else 1)
            here[j] = min(diagonal, above[j] + 1, here[j - 1] + 1)
    pairs = []
    i, j = len(a), len(b)
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1] and cost[i][j] == cost[i - 1][j - 1]:
            pairs.append((i, j))
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        elif cost[i][j] == cost[i][j - 1] + 1:
            j -= 1
        else:
            i, j = i - 1, j - 1
    return pairs[::-1]


def align_offsets(
    student_ends: list[int], teacher_ends: list[int], student_text: bytes, teacher_text: bytes
) -> SpanAlignment:
    """Spans from both sides' token end offsets and the texts those offsets index.

    Args:
        student_ends: ``[n]`` nondecreasing end byte offset of each student token in ``student_text``
            (a token that ends where the previous one did covers no bytes: a special token).
        teacher_ends: ``[m]`` the same for the teacher.
        student_text: the bytes the student's tokens cover, in order.
        teacher_text: the teacher's.

    Returns:
        A :class:`SpanAlignment`; a span's bytes are equal on both sides. Linear in ``n + m`` plus the
        general path's dynamic programme where the texts differ.
    """
    mapping = _position_map(student_text, teacher_text)
    student_positions = {0, *student_ends}
    # Boundaries: (student position, teacher position) pairs where both sides may cut, in text order.
    boundaries = sorted(
        {(mapping[q], q) for q in {0, *teacher_ends} if mapping[q] >= 0 and mapping[q] in student_positions}
    )
    alignment = SpanAlignment()
    student_groups, student_specials = _group(student_ends, [b[0] for b in boundaries])
    teacher_groups, teacher_specials = _group(teacher_ends, [b[1] for b in boundaries])
    for k in range(1, len(boundaries)):
        (s_lo, t_lo), (s_hi, t_hi) = boundaries[k - 1], boundaries[k]
        s_tokens, t_tokens = student_groups.get(k), teacher_groups.get(k)
        if s_tokens and t_tokens and student_text[s_lo:s_hi] == teacher_text[t_lo:t_hi]:
            alignment.add(s_tokens, t_tokens)
            student_groups.pop(k), teacher_groups.pop(k)
    for k, s_tokens in student_specials.items():
        t_tokens = teacher_specials.pop(k, None)
        if t_tokens:
            alignment.add(s_tokens, t_tokens, special=True)
        else:
            alignment.student_unaligned.extend(range(*s_tokens))
    for t_tokens in teacher_specials.values():
        alignment.teacher_unaligned.extend(range(*t_tokens))
    for s_tokens in student_groups.values():
        alignment.student_unaligned.extend(range(*s_tokens))
    for t_tokens in teacher_groups.values():
        alignment.teacher_unaligned.extend(range(*t_tokens))
    _sort(alignment, len(student_ends), len(teacher_ends))
    return alignment


def _group(ends: list[int], cuts: list[int]) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """Tokens grouped by the cut they end at or before.

    Returns ``({k: (first, last + 1)}, {k: (first, last + 1)})``: text tokens ending in
    ``(cuts[k-1], cuts[k]]`` (key ``len(cuts)`` for those past the last cut), and the special
    (zero-width) tokens sitting exactly at ``cuts[k]`` (key ``-1 - index`` for a special elsewhere).
    A special token between two text tokens of one group stays inside that group's range.
    """
    text_groups: dict[int, tuple[int, int]] = {}
    special_groups: dict[int, tuple[int, int]] = {}
    k, previous_end = 0, 0
    for index, end in enumerate(ends):
        while k < len(cuts) and cuts[k] < end:
            k += 1
        if end == previous_end:  # zero width: a special token
            key = k if k < len(cuts) and cuts[k] == end else -1 - index
            groups = special_groups
        else:
            key, groups = k, text_groups
        previous_end = end
        first = groups[key][0] if key in groups else index
        groups[key] = (first, index + 1)
    return text_groups, special_groups


def _sort(alignment: SpanAlignment, num_student: int, num_teacher: int) -> None:
    """Order spans by their first student token and the unaligned lists ascending."""
    order = sorted(range(len(alignment)), key=lambda j: (alignment.student_starts[j], alignment.teacher_starts[j]))
    for name in ("student_starts", "student_ends", "teacher_starts", "teacher_ends", "special"):
        values = getattr(alignment, name)
        setattr(alignment, name, [values[j] for j in order])
    alignment.student_unaligned = sorted(i for i in alignment.student_unaligned if i < num_student)
    alignment.teacher_unaligned = sorted(i for i in alignment.teacher_unaligned if i < num_teacher)


def align_token_ids(
    student_ids: list[int],
    teacher_ids: list[int],
    student_table: list[bytes],
    teacher_table: list[bytes],
) -> SpanAlignment:
    """Spans of two token-id sequences meant to stand for the same text (e.g. one completion, tokenized twice).

    Args:
        student_ids: ``[n]`` student token ids.
        teacher_ids: ``[m]`` teacher token ids.
        student_table, teacher_table: :func:`token_byte_table` of each tokenizer.

    Returns:
        A :class:`SpanAlignment` with token indices into ``student_ids`` / ``teacher_ids``.
    """
    student_ends, student_text = byte_offsets(student_ids, student_table)
    teacher_ends, teacher_text = byte_offsets(teacher_ids, teacher_table)
    return align_offsets(student_ends, teacher_ends, student_text, teacher_text)

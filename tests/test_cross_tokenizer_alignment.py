"""Alignment of two tokenizations of the same text, on hostile text; the vocabulary map and its audit."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from cross_tokenizer_helpers import CORPUS, HOSTILE, byte_bpe, sentencepiece_like

from distill.cache import tokenizer_fingerprint
from distill.data import prepare_dataset
from distill.data.alignment import (
    SpanAlignment,
    align_offsets,
    align_token_ids,
    byte_offsets,
    char_to_byte_offsets,
    token_byte_table,
)
from distill.models.vocab_map import build_vocab_map, coverage_audit
from distill.testing import train_tiny_tokenizer


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    """(student, teacher): ChatML byte-level BPE 512 vs. a Llama-3-style one splitting digits, with a BOS."""
    return train_tiny_tokenizer(512), byte_bpe(700, CORPUS, split_digits=True)


def check_spans(alignment: SpanAlignment, s_ids, t_ids, s_table, t_table) -> None:  # noqa: ANN001
    """Every span covers the same bytes on both sides; spans are disjoint, ordered, and cut where both sides cut."""
    last_s = last_t = 0
    for j in range(len(alignment)):
        s_lo, s_hi = alignment.student_starts[j], alignment.student_ends[j]
        t_lo, t_hi = alignment.teacher_starts[j], alignment.teacher_ends[j]
        assert s_lo >= last_s and t_lo >= last_t and s_hi > s_lo and t_hi > t_lo
        last_s, last_t = s_hi, t_hi
        s_bytes = b"".join(s_table[i] for i in s_ids[s_lo:s_hi])
        t_bytes = b"".join(t_table[i] for i in t_ids[t_lo:t_hi])
        assert s_bytes == t_bytes, (j, s_bytes, t_bytes)
        assert bool(s_bytes) != alignment.special[j]


def test_hostile_text_aligns_completely_and_minimally(pair) -> None:  # noqa: ANN001
    student, teacher = pair
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    s_ids = student(HOSTILE, add_special_tokens=False)["input_ids"]
    t_ids = teacher(HOSTILE, add_special_tokens=False)["input_ids"]
    assert s_ids != t_ids
    assert b"".join(s_table[i] for i in s_ids) == HOSTILE.encode()  # multibyte characters split into bytes exactly
    alignment = align_token_ids(s_ids, t_ids, s_table, t_table)
    check_spans(alignment, s_ids, t_ids, s_table, t_table)
    assert not alignment.student_unaligned and not alignment.teacher_unaligned
    # Minimal: a span never contains a position where both sides cut.
    s_ends, _ = byte_offsets(s_ids, s_table)
    t_ends, _ = byte_offsets(t_ids, t_table)
    cuts = set(s_ends) & set(t_ends)
    for j in range(len(alignment)):
        inner = s_ends[alignment.student_starts[j] : alignment.student_ends[j] - 1]
        assert not cuts.intersection(inner)
    # Digits: the teacher splits them one by one, the student merges some: they meet at the number's end.
    digit_spans = [j for j in range(len(alignment)) if alignment.teacher_ends[j] - alignment.teacher_starts[j] > 1]
    assert digit_spans
    # The 40-space run is covered by spans of equal bytes, whatever each side's whitespace tokens are.
    assert alignment.one_to_one.count(True) >= len(alignment) // 3


def test_bos_on_one_side_and_eos_on_both(pair) -> None:  # noqa: ANN001
    student, teacher = pair
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    text = "x = 1  # 中"
    s_ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    t_ids = [teacher.bos_token_id] + teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    alignment = align_token_ids(s_ids, t_ids, s_table, t_table)
    check_spans(alignment, s_ids, t_ids, s_table, t_table)
    assert alignment.teacher_unaligned == [0]  # the BOS only the teacher has
    assert alignment.student_unaligned == []
    assert alignment.special[-1]  # EOS <-> EOS, a span of its own
    assert (alignment.student_starts[-1], alignment.teacher_starts[-1]) == (len(s_ids) - 1, len(t_ids) - 1)


def test_different_chat_templates_align_the_completion_only(pair) -> None:  # noqa: ANN001
    """Each side renders the prompt with its own template; the completions' bytes align, markers do not."""
    import datasets

    student, teacher = pair
    rows = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "Add 12 and 30."},
                    {"role": "assistant", "content": "12 + 30 = 42  # done\n    ok"},
                ]
            }
        ]  # fmt: skip
    )
    s_rows, _ = prepare_dataset(rows, student, max_length=128)
    t_rows, _ = prepare_dataset(rows, teacher, max_length=128)
    s_all, t_all = s_rows[0]["input_ids"], t_rows[0]["input_ids"]
    assert s_all[:3] != t_all[:3]  # the prompts differ (ChatML vs. Llama-3 headers with a BOS)
    s_ids = [i for i, label in zip(s_all, s_rows[0]["labels"], strict=True) if label != -100]
    t_ids = [i for i, label in zip(t_all, t_rows[0]["labels"], strict=True) if label != -100]
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    alignment = align_token_ids(s_ids, t_ids, s_table, t_table)
    check_spans(alignment, s_ids, t_ids, s_table, t_table)
    covered = b"".join(
        b"".join(s_table[i] for i in s_ids[alignment.student_starts[j] : alignment.student_ends[j]])
        for j in range(len(alignment))
    )
    assert b"12 + 30 = 42  # done\n    ok" in covered
    # The end-of-turn markers differ (<|im_end|> then "\n" vs <|eot_id|>): paired by position as specials.
    assert alignment.special[-1] or alignment.student_unaligned


def test_general_path_sentencepiece_dummy_space() -> None:
    """A SentencePiece-style tokenizer's text starts with a dummy space: the DP path aligns everything else."""
    student = sentencepiece_like(CORPUS)
    teacher = train_tiny_tokenizer(512)
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    text = "héllo wörld 12345\n    return  中文"
    s_ids = student(text, add_special_tokens=False)["input_ids"]
    t_ids = teacher(text, add_special_tokens=False)["input_ids"]
    s_ends, s_text = byte_offsets(s_ids, s_table)
    assert s_text == b" " + text.encode()  # not the same bytes: the fast path cannot apply
    alignment = align_token_ids(s_ids, t_ids, s_table, t_table)
    check_spans(alignment, s_ids, t_ids, s_table, t_table)
    # Only the student's first token (which carries the dummy space) and the teacher tokens of its text stay out.
    assert alignment.student_unaligned == [0]
    covered = b"".join(s_table[i] for i in s_ids[alignment.student_starts[0] :])
    assert covered == s_text[s_ends[0] :] and len(alignment) >= 10
    # Unequal texts with a different middle: the differing bytes stay unaligned, the rest aligns.
    other = align_offsets([3, 6, 9], [3, 5, 8], b"abcXYZdef", b"abcQQdef")
    assert (other.student_starts, other.teacher_starts) == ([0, 2], [0, 2])
    assert other.student_unaligned == [1] and other.teacher_unaligned == [1]


def test_offset_mapping_fast_path_agrees_with_byte_tables(pair) -> None:  # noqa: ANN001
    student, teacher = pair
    text = "for i in range(10):\n    total += i  # sum"
    encodings = [tok(text, add_special_tokens=False, return_offsets_mapping=True) for tok in pair]
    ends = [[end for _, end in char_to_byte_offsets(text, enc["offset_mapping"])] for enc in encodings]
    from_offsets = align_offsets(ends[0], ends[1], text.encode(), text.encode())
    from_ids = align_token_ids(
        encodings[0]["input_ids"], encodings[1]["input_ids"], token_byte_table(student), token_byte_table(teacher)
    )
    assert from_offsets == from_ids


def test_alignment_is_linear_in_length(pair) -> None:  # noqa: ANN001
    student, teacher = pair
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    timings = []
    for copies in (20, 80):
        text = HOSTILE * copies
        s_ids = student(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        alignment = align_token_ids(s_ids, t_ids, s_table, t_table)
        timings.append(time.perf_counter() - start)
        assert not alignment.student_unaligned
    assert timings[1] < 12 * timings[0] + 0.05, timings  # 4x the text: ~4x the time, not 16x


def test_vocab_map_pins_exact_tokens_caches_and_audits(pair, tmp_path) -> None:  # noqa: ANN001
    student, teacher = pair
    fingerprints = (tokenizer_fingerprint(student), tokenizer_fingerprint(teacher))
    vocab_map = build_vocab_map(student, teacher, fingerprints, tmp_path)
    s_table, t_table = token_byte_table(student), token_byte_table(teacher)
    for token_id in range(len(student)):
        cls = int(vocab_map.student_classes[token_id])
        if vocab_map.pinned[token_id] and s_table[token_id]:
            assert t_table[cls] == s_table[token_id]
        elif cls >= 0 and s_table[token_id]:
            assert s_table[token_id].startswith(t_table[cls]) and len(t_table[cls]) < len(s_table[token_id])
    assert int(vocab_map.student_classes[student.eos_token_id]) == teacher.eos_token_id  # specials by role
    # Digits: the teacher has single digits only, so a multi-digit student token maps coarser.
    multi_digit = [i for i, piece in enumerate(s_table) if len(piece.strip()) > 1 and piece.strip().isdigit()]
    assert all(not vocab_map.pinned[i] for i in multi_digit)
    # Cached on disk by both fingerprints: the second build reads it.
    assert len(list(tmp_path.glob("vocab_map-*.pt"))) == 1
    again = build_vocab_map(student, teacher, fingerprints, tmp_path)
    assert torch.equal(again.student_classes, vocab_map.student_classes)
    audit = coverage_audit(student, teacher, vocab_map)
    text = str(audit)
    for category in ("digits", "whitespace", "code punctuation", "special tokens"):
        assert category in text
    # Identical tokenizers: the identity, everything pinned, no "elsewhere" class.
    same = build_vocab_map(student, student, (fingerprints[0], fingerprints[0]), tmp_path)
    assert torch.equal(same.student_classes, torch.arange(len(student))) and bool(same.pinned.all())
    projection = same.projection(len(student), len(student))
    assert projection.num_classes == len(student) and projection.elsewhere is None

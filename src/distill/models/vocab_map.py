"""A sparse student -> teacher vocabulary map, built once per tokenizer pair, cached, and audited.

Every student token is re-tokenised by the teacher: its *class* is the first teacher token of its text
(a student token whose bytes are exactly one teacher token is *pinned* to it). A teacher token no
student token maps to gives its mass to the class of its own first student token, so both models'
distributions push forward onto the same outcomes (:class:`distill.losses.cross_vocab.VocabProjection`).
The map is kept on disk keyed by both tokenizers' fingerprints (:func:`distill.cache.tokenizer_fingerprint`)
and audited before training (:func:`coverage_audit`): which kinds of tokens (digits, whitespace runs,
code punctuation, special tokens) map one-to-one, and which only to a coarser class.
"""

from __future__ import annotations

import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.data.alignment import special_token_ids, token_byte_table
from distill.losses.cross_vocab import VocabProjection

__all__ = ["CoverageAudit", "VocabMap", "build_vocab_map", "coverage_audit", "default_vocab_map_dir"]

logger = logging.getLogger(__name__)

_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_PUNCTUATION = set(string.punctuation.encode())
_MAP_FORMAT = 1


def default_vocab_map_dir() -> Path:
    """``$DISTILL_CACHE/vocab_maps`` or ``~/.cache/distill/vocab_maps``."""
    root = os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill"
    return Path(root) / "vocab_maps"


@dataclass
class VocabMap:
    """Classes of both vocabularies, as built for one tokenizer pair.

    Attributes:
        student_classes: ``[len(student tokenizer)]`` teacher id (class) of each student token, -1 for none.
        teacher_classes: ``[len(teacher tokenizer)]`` class of each teacher token, -1 for none.
        pinned: ``[len(student tokenizer)]`` the student token's bytes are exactly its class's teacher token.
        student_fingerprint, teacher_fingerprint: the tokenizers it was built for.
    """

    student_classes: torch.Tensor
    teacher_classes: torch.Tensor
    pinned: torch.Tensor
    student_fingerprint: str
    teacher_fingerprint: str

    def projection(self, student_rows: int, teacher_rows: int) -> VocabProjection:
        """The loss's :class:`VocabProjection` for heads of these row counts.

        Head rows beyond a tokenizer (padding) and tokens without a class go to one "elsewhere" class,
        which exists only when something maps there (an identical pair of tokenizers has none).
        """
        student = _fit(self.student_classes, student_rows)
        teacher = _fit(self.teacher_classes, teacher_rows)
        elsewhere = bool((student < 0).any() or (teacher < 0).any())
        num_classes = teacher_rows + (1 if elsewhere else 0)
        student = torch.where(student < 0, num_classes - 1, student)
        teacher = torch.where(teacher < 0, num_classes - 1, teacher)
        pinned_ids = self.pinned.nonzero().squeeze(-1)
        pinned_ids = pinned_ids[pinned_ids < student_rows]
        matched_teacher = self.student_classes[pinned_ids]
        keep = matched_teacher < teacher_rows
        return VocabProjection(student, teacher, num_classes, pinned_ids[keep], matched_teacher[keep])


def _fit(classes: torch.Tensor, rows: int) -> torch.Tensor:
    if classes.numel() >= rows:
        return classes[:rows].clone()
    return torch.cat([classes, classes.new_full((rows - classes.numel(),), -1)])


def _first_token_classes(
    source_table: list[bytes], target_table: list[bytes], target_tokenizer: Any, source_special: set[int]
) -> list[int]:
    """For each source token, the target id of the first target token of its bytes (-1: none).

    The exact one-token match first; then the target tokenizer's own tokenization of the text (kept when
    its first token's bytes start the source token's bytes); then the longest target token that starts
    them (a partial UTF-8 byte sequence cannot be re-tokenised as text).
    """
    by_bytes: dict[bytes, int] = {}
    for target_id, piece in enumerate(target_table):
        if piece and piece not in by_bytes:
            by_bytes[piece] = target_id
    classes = [-1] * len(source_table)
    pending: list[int] = []
    texts: list[str] = []
    for source_id, piece in enumerate(source_table):
        if source_id in source_special or not piece:
            continue
        if piece in by_bytes:
            classes[source_id] = by_bytes[piece]
            continue
        try:
            texts.append(piece.decode("utf-8"))
            pending.append(source_id)
        except UnicodeDecodeError:
            classes[source_id] = _longest_prefix(piece, by_bytes)
    if texts:
        encoded = target_tokenizer(texts, add_special_tokens=False)["input_ids"]
        for source_id, ids in zip(pending, encoded, strict=True):
            piece = source_table[source_id]
            first = ids[0] if ids else -1
            if first >= 0 and target_table[first] and piece.startswith(target_table[first]):
                classes[source_id] = first
            else:
                classes[source_id] = _longest_prefix(piece, by_bytes)
    return classes


def _longest_prefix(piece: bytes, by_bytes: dict[bytes, int]) -> int:
    for length in range(len(piece) - 1, 0, -1):
        if piece[:length] in by_bytes:
            return by_bytes[piece[:length]]
    return -1


def _special_pairs(student_tokenizer: Any, teacher_tokenizer: Any) -> dict[int, int]:
    """Student special id -> teacher special id, by role (bos, eos, pad, unk) and then by identical string."""
    pairs: dict[int, int] = {}
    teacher_specials = {teacher_tokenizer.convert_ids_to_tokens(i): i for i in special_token_ids(teacher_tokenizer)}
    for student_id in special_token_ids(student_tokenizer):
        token = student_tokenizer.convert_ids_to_tokens(student_id)
        if token in teacher_specials:
            pairs[student_id] = teacher_specials[token]
    for role in _ROLES:
        student_id, teacher_id = getattr(student_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
        if student_id is not None and teacher_id is not None:
            pairs.setdefault(student_id, teacher_id)
    return pairs


def build_vocab_map(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    fingerprints: tuple[str, str],
    cache_dir: str | Path | None = None,
) -> VocabMap:
    """The student -> teacher map of this tokenizer pair, loaded from ``cache_dir`` when built before.

    Args:
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer.
        fingerprints: ``(student, teacher)`` :func:`distill.cache.tokenizer_fingerprint` of both (the
            cache key; computed by the caller, as the on-disk formats sit above this layer).
        cache_dir: where maps are kept (default :func:`default_vocab_map_dir`).

    Returns:
        The :class:`VocabMap`; built in seconds for 50k-token vocabularies, then read from disk.
    """
    student_fp, teacher_fp = fingerprints
    folder = Path(cache_dir) if cache_dir is not None else default_vocab_map_dir()
    path = folder / f"vocab_map-v{_MAP_FORMAT}-{student_fp[:20]}-{teacher_fp[:20]}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["student_fingerprint"] == student_fp and saved["teacher_fingerprint"] == teacher_fp:
            return VocabMap(**saved)
    student_table, teacher_table = token_byte_table(student_tokenizer), token_byte_table(teacher_tokenizer)
    student_special = special_token_ids(student_tokenizer)
    teacher_special = special_token_ids(teacher_tokenizer)
    student_classes = _first_token_classes(student_table, teacher_table, teacher_tokenizer, student_special)
    specials = _special_pairs(student_tokenizer, teacher_tokenizer)
    for student_id, teacher_id in specials.items():
        student_classes[student_id] = teacher_id
    pinned = [
        cls >= 0 and (student_table[i] == teacher_table[cls] if i not in specials else True)
        for i, cls in enumerate(student_classes)
    ]
    image = set(student_classes)
    teacher_first_student = _first_token_classes(teacher_table, student_table, student_tokenizer, teacher_special)
    special_back = {teacher_id: student_id for student_id, teacher_id in specials.items()}
    teacher_classes = []
    for teacher_id, first_student in enumerate(teacher_first_student):
        if teacher_id in image:
            teacher_classes.append(teacher_id)
        elif teacher_id in special_back:
            teacher_classes.append(student_classes[special_back[teacher_id]])
        else:
            teacher_classes.append(student_classes[first_student] if first_student >= 0 else -1)
    result = VocabMap(
        torch.tensor(student_classes, dtype=torch.long),
        torch.tensor(teacher_classes, dtype=torch.long),
        torch.tensor(pinned, dtype=torch.bool),
        student_fp,
        teacher_fp,
    )
    folder.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({name: getattr(result, name) for name in result.__dataclass_fields__}, staging)
    staging.replace(path)
    return result


def _category(piece: bytes, special: bool) -> str:
    if special:
        return "special tokens"
    stripped = piece.lstrip(b" ")
    if piece and all(byte in b" \t\n\r" for byte in piece):
        return "whitespace runs / indentation" if len(piece) > 1 else "single whitespace"
    if stripped and stripped.isdigit():
        return "digits"
    if stripped and all(byte in _PUNCTUATION for byte in stripped):
        return "code punctuation"
    return "words and other"


@dataclass
class CoverageAudit:
    """How well each kind of student token maps onto the teacher's vocabulary.

    Attributes:
        rows: per category ``(category, student tokens, pinned, coarser, none, examples of coarser)``;
            *pinned*: the student token is exactly one teacher token; *coarser*: it maps to a shorter
            teacher token (its probability is compared at the granularity of that class); *none*: no class.
        teacher_merged: per category ``(category, teacher tokens, merged into another class)``.
    """

    rows: list[tuple[str, int, int, int, int, list[str]]]
    teacher_merged: list[tuple[str, int, int]]

    def bad(self, threshold: float = 0.5) -> list[str]:
        """Categories where fewer than ``threshold`` of the student tokens are pinned."""
        return [row[0] for row in self.rows if row[1] and row[2] / row[1] < threshold]

    def __str__(self) -> str:
        lines = ["Vocabulary map coverage (student tokens -> teacher tokens):"]
        lines.append(f"  {'category':32} {'tokens':>8} {'pinned':>8} {'coarser':>8} {'none':>6}  e.g. coarser")
        for category, total, pinned, coarser, none, examples in self.rows:
            share = f"{100 * pinned / total:5.1f}%" if total else "   -  "
            lines.append(f"  {category:32} {total:8,} {share:>8} {coarser:8,} {none:6,}  {', '.join(examples)}")
        merged = ", ".join(f"{c}: {m:,}/{t:,}" for c, t, m in self.teacher_merged if m)
        lines.append(f"  teacher tokens merged into a coarser class: {merged or 'none'}")
        bad = self.bad()
        if bad:
            lines.append(
                f"  maps badly: {', '.join(bad)} (under half pinned: the KD signal there is coarse; consider a "
                "higher ce_weight)"
            )
        return "\n".join(lines)


def coverage_audit(student_tokenizer: Any, teacher_tokenizer: Any, vocab_map: VocabMap) -> CoverageAudit:
    """Audit ``vocab_map`` by kind of token (digits, whitespace runs, code punctuation, special tokens)."""
    student_table, teacher_table = token_byte_table(student_tokenizer), token_byte_table(teacher_tokenizer)
    student_special, teacher_special = special_token_ids(student_tokenizer), special_token_ids(teacher_tokenizer)
    stats: dict[str, list[Any]] = {}
    classes = vocab_map.student_classes.tolist()
    pinned = vocab_map.pinned.tolist()
    for token_id, piece in enumerate(student_table):
        entry = stats.setdefault(_category(piece, token_id in student_special), [0, 0, 0, 0, []])
        entry[0] += 1
        if pinned[token_id]:
            entry[1] += 1
        elif classes[token_id] < 0:
            entry[3] += 1
        else:
            entry[2] += 1
            if len(entry[4]) < 3:
                target = teacher_table[classes[token_id]]
                entry[4].append(f"{piece.decode(errors='replace')!r}->{target.decode(errors='replace')!r}")
    rows = [(category, *values[:4], values[4]) for category, values in sorted(stats.items())]
    merged: dict[str, list[int]] = {}
    teacher_classes = vocab_map.teacher_classes.tolist()
    for token_id, piece in enumerate(teacher_table):
        entry = merged.setdefault(_category(piece, token_id in teacher_special), [0, 0])
        entry[0] += 1
        entry[1] += teacher_classes[token_id] != token_id
    return CoverageAudit(rows, [(category, t, m) for category, (t, m) in sorted(merged.items())])

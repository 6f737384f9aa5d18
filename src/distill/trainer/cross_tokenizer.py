"""Cross-tokenizer distillation in the trainer: teacher-side rows, span positions, the collator, the loss call.

When the teacher's tokenizer differs from the student's (``DistillConfig.cross_tokenizer``), every row is
prepared twice: once with the student's tokenizer and chat template (as always) and once with the
teacher's, so each side renders the prompt its own way. The completion tokens of both (the tokens with
labels) are aligned (:func:`distill.data.alignment.align_token_ids`) and each row carries, per span,
the student position and the teacher position that predict the span's first token. At each step the
teacher runs on its own token ids and the loss (:func:`distill.losses.cross_vocab.cross_vocab_loss`)
compares both at those positions, chunked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DistillConfig
from distill.data import prepare_dataset
from distill.data.alignment import align_token_ids, token_byte_table
from distill.formats.reader import tokenizer_fingerprint
from distill.losses import DistillationOutput, Objective, SparseTargets, TeacherHead, default_chunk_size
from distill.losses.cross_vocab import VocabProjection, cross_vocab_loss
from distill.models import VocabularyMismatchError, check_tokenizers_match
from distill.models.decoder import final_hidden_states, output_head_of
from distill.models.vocab_map import build_vocab_map, coverage_audit
from distill.teachers import TeacherTargets
from distill.teachers.sharding import student_head
from distill.trainer.batching import IGNORE_INDEX, next_token_labels

__all__ = ["Columns", "CrossTokenizer", "CrossTokenizerCollator", "span_positions", "uses_cross_tokenizer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Columns:
    """Names of one teacher's columns in rows and batches (a prefix keeps several teachers' apart)."""

    prefix: str = ""

    @property
    def teacher_ids(self) -> str:
        return self.prefix + "teacher_input_ids"

    @property
    def teacher_mask(self) -> str:
        return self.prefix + "teacher_attention_mask"

    @property
    def teacher_labels(self) -> str:
        return self.prefix + "teacher_labels"

    @property
    def student_pos(self) -> str:
        return self.prefix + "xt_student_pos"

    @property
    def teacher_pos(self) -> str:
        return self.prefix + "xt_teacher_pos"


def uses_cross_tokenizer(args: DistillConfig, student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """Whether this run distils across tokenizers: ``cross_tokenizer='on'``, or ``'auto'`` and they differ."""
    if args.cross_tokenizer == "on":
        return True
    if args.cross_tokenizer == "off":
        return False
    try:
        check_tokenizers_match(student_tokenizer, teacher_tokenizer)
    except VocabularyMismatchError:
        return True
    return False


def span_positions(
    student_ids: list[int],
    student_labels: list[int],
    teacher_ids: list[int],
    teacher_labels: list[int],
    student_table: list[bytes],
    teacher_table: list[bytes],
) -> tuple[list[int], list[int], int]:
    """Per span of the two completions, the positions (in each full row) that predict the span's first token.

    Args:
        student_ids, student_labels: one prepared student row (unshifted labels, -100 outside the completion).
        teacher_ids, teacher_labels: the same row prepared with the teacher's tokenizer and template.
        student_table, teacher_table: :func:`~distill.data.alignment.token_byte_table` of both tokenizers.

    Returns:
        ``(student positions [J], teacher positions [J], unaligned student completion tokens)``; a span
        whose first token is a row's first token (no position predicts it) is left out.
    """
    student_index = [i for i, label in enumerate(student_labels) if label != IGNORE_INDEX]
    teacher_index = [i for i, label in enumerate(teacher_labels) if label != IGNORE_INDEX]
    alignment = align_token_ids(
        [student_ids[i] for i in student_index], [teacher_ids[i] for i in teacher_index], student_table, teacher_table
    )
    student_positions, teacher_positions = [], []
    for s_start, t_start in zip(alignment.student_starts, alignment.teacher_starts, strict=True):
        s_pos, t_pos = student_index[s_start] - 1, teacher_index[t_start] - 1
        if s_pos >= 0 and t_pos >= 0:
            student_positions.append(s_pos)
            teacher_positions.append(t_pos)
    return student_positions, teacher_positions, len(alignment.student_unaligned)


@dataclass
class CrossTokenizerCollator:
    """:class:`~distill.data.DistillCollator` plus the teacher's ids (right-padded) and the span positions.

    Adds ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, L_t]`` and ``xt_student_pos`` /
    ``xt_teacher_pos`` ``[B, J]`` (-1 where a row has fewer spans).
    """

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]
    teacher_pad_token_id: int
    columns: Columns = Columns()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(rows)
        names = self.columns
        teacher_ids = [list(row[names.teacher_ids]) for row in rows]
        length = max(len(ids) for ids in teacher_ids)
        batch[names.teacher_ids] = _pad(teacher_ids, length, self.teacher_pad_token_id)
        batch[names.teacher_mask] = _pad([[1] * len(ids) for ids in teacher_ids], length, 0)
        spans = max(1, max(len(row[names.student_pos]) for row in rows))
        for key in (names.student_pos, names.teacher_pos):
            batch[key] = _pad([list(row[key]) for row in rows], spans, -1)
        return batch


def _pad(rows: list[list[int]], length: int, value: int) -> Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class CrossTokenizer:
    """Everything cross-tokenizer distillation needs beyond the usual run, built once in ``Trainer.__init__``.

    Args:
        student_tokenizer, teacher_tokenizer: both tokenizers (fast, with chat templates for chat rows).
        args: the run's config (``cross_tokenizer_loss``, ``vocab_map_dir``, ``max_length``, the loss fields).
    """

    def __init__(
        self, student_tokenizer: Any, teacher_tokenizer: Any, args: DistillConfig, columns: Columns = Columns()
    ) -> None:
        _refuse_unsupported(args)
        self.student_tokenizer, self.teacher_tokenizer, self.args = student_tokenizer, teacher_tokenizer, args
        self.columns = columns
        fingerprints = (tokenizer_fingerprint(student_tokenizer), tokenizer_fingerprint(teacher_tokenizer))
        self.vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer, fingerprints, args.vocab_map_dir)
        self.audit = coverage_audit(student_tokenizer, teacher_tokenizer, self.vocab_map)
        logger.warning("%s", self.audit)  # shown before training, with the data report
        self.student_table = token_byte_table(student_tokenizer)
        self.teacher_table = token_byte_table(teacher_tokenizer)
        self.projection: VocabProjection | None = None
        self.unaligned_tokens = 0

    def bind(self, student_rows: int, teacher_rows: int) -> None:
        """Fix the projection to the two heads' row counts (known once both models are loaded)."""
        self.projection = self.vocab_map.projection(student_rows, teacher_rows)

    def add_teacher_columns(self, prepared: Any, raw: Any) -> Any:
        """``prepared`` (student rows) with the teacher's ids and the span positions of each row added.

        Args:
            prepared: rows from :func:`~distill.data.prepare_dataset` with the student's tokenizer.
            raw: the dataset they were prepared from (prepared again with the teacher's tokenizer here).
        """
        args = self.args
        teacher_rows, report = prepare_dataset(
            raw, self.teacher_tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only_loss,
            num_proc=args.dataset_num_proc,
        )  # fmt: skip
        logger.info("teacher-side data: %s", report)
        student_positions, teacher_positions, unaligned = [], [], 0
        for student_row, teacher_row in zip(prepared, teacher_rows, strict=True):
            s_pos, t_pos, missed = span_positions(
                student_row["input_ids"], student_row["labels"], teacher_row["input_ids"], teacher_row["labels"],
                self.student_table, self.teacher_table,
            )  # fmt: skip
            student_positions.append(s_pos)
            teacher_positions.append(t_pos)
            unaligned += missed
        self.unaligned_tokens += unaligned
        names = self.columns
        prepared = prepared.add_column(names.teacher_ids, teacher_rows["input_ids"])
        prepared = prepared.add_column(names.teacher_labels, teacher_rows["labels"])
        prepared = prepared.add_column(names.student_pos, student_positions)
        return prepared.add_column(names.teacher_pos, teacher_positions)

    def teacher_rows(self, prepared: Any) -> dict[str, Any]:
        """The teacher-side rows (``input_ids``, ``labels``) of prepared data, for the teacher's own checks."""
        return {"input_ids": prepared[self.columns.teacher_ids], "labels": prepared[self.columns.teacher_labels]}

    def check_teacher(self, teacher: Any) -> None:
        """A teacher that records the tokenizer it was built with (a cache) must have the teacher's tokenizer."""
        check = getattr(teacher, "check_tokenizer", None)
        if check is not None:
            check(self.teacher_tokenizer)

    def collator(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> CrossTokenizerCollator:
        """``base`` (e.g. a :class:`~distill.data.DistillCollator`) plus this teacher's columns."""
        pad = self.teacher_tokenizer.pad_token_id
        pad = pad if pad is not None else self.teacher_tokenizer.eos_token_id
        return CrossTokenizerCollator(base, 0 if pad is None else pad, self.columns)

    def teacher_targets(self, teacher: Any, inputs: dict[str, Any]) -> TeacherTargets:
        """The teacher's targets on its own token ids: ``[B, L_t, ...]``."""
        return teacher.targets(inputs[self.columns.teacher_ids], inputs[self.columns.teacher_mask], None)

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        teacher_targets: TeacherTargets,
        objective: Objective,
        hidden: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> DistillationOutput:
        """The cross-tokenizer loss of one micro-batch (see :func:`~distill.losses.cross_vocab.cross_vocab_loss`).

        Args:
            model: the student.
            inputs: the batch (with this teacher's columns).
            teacher_targets: the teacher's targets on its own tokens.
            objective: the loss settings.
            hidden: the student's ``[B, L, H]`` final hidden states when already computed (several teachers).
            targets: ``[B, L]`` next-token labels to use instead of the batch's (rows routed elsewhere masked).
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if hidden is None:
            hidden = final_hidden_states(model, input_ids, attention_mask, None)
        head = student_head(output_head_of(model))
        assert self.projection is not None, "call bind() once both models are loaded"
        batch, length = input_ids.shape
        targets = (next_token_labels(inputs["labels"]) if targets is None else targets).reshape(-1)
        student_pos, teacher_pos = inputs[self.columns.student_pos], inputs[self.columns.teacher_pos]
        valid = student_pos >= 0
        row_of_span = torch.arange(batch, device=student_pos.device)[:, None].expand_as(student_pos)[valid]
        student_flat = row_of_span * length + student_pos[valid]
        teacher_flat = row_of_span * inputs[self.columns.teacher_ids].shape[1] + teacher_pos[valid]
        span_of_position = torch.full((batch * length,), -1, dtype=torch.long, device=input_ids.device)
        span_of_position[student_flat] = torch.arange(student_flat.numel(), device=input_ids.device)
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # host-device sync: the loss tokens
        span_of_row = span_of_position[rows]
        kept = span_of_row[span_of_row >= 0]  # spans at loss positions, in row order
        span_of_row[span_of_row >= 0] = torch.arange(kept.numel(), device=kept.device)
        teacher = _take_teacher_rows(teacher_targets, teacher_flat[kept])
        return cross_vocab_loss(
            hidden.reshape(-1, hidden.shape[-1])[rows], head, targets[rows], span_of_row, teacher, self.projection,
            self.args.cross_tokenizer_loss, objective,
            chunk_size=self.args.loss_chunk_size or default_chunk_size(self.projection.num_classes, hidden.device),
        )  # fmt: skip


def _take_teacher_rows(targets: TeacherTargets, flat_positions: Tensor) -> TeacherTargets:
    """The teacher's targets at the given flattened ``[B * L_t]`` positions: ``[J, ...]``."""
    if isinstance(targets, SparseTargets):
        return targets.flatten().take(flat_positions.to(targets.topk_ids.device))
    hidden = targets.hidden.reshape(-1, targets.hidden.shape[-1])[flat_positions.to(targets.hidden.device)]
    return TeacherHead(hidden, targets.weight, targets.bias, targets.softcap)


def per_row_teacher_problems(args: DistillConfig, *, explained: bool) -> list[str]:
    """Settings that teacher-side rows prepared per row (cross-tokenizer, several teachers) cannot serve.

    Each entry names the setting, with the reason when ``explained`` (the cross-tokenizer message gives it).
    """
    table = (
        (args.packing, "packing=True", " (rows are aligned one by one)"),
        (args.uses_generation, "on-policy or sequence-level KD (lmbda > 0 / seq_kd",
         ": generated text is not re-aligned yet"),
        (args.hidden_loss_weight > 0, "hidden_loss_weight > 0", " (the two models' positions differ)"),
        (args.loss_implementation != "fused", "loss_implementation='dense'",
         " (the cross-tokenizer loss is chunked only)"),
    )  # fmt: skip
    problems = []
    for applies, setting, reason in table:
        if applies:
            closing = ")" if setting.endswith("seq_kd") else ""
            problems.append(setting + (reason if explained else "") + closing)
    return problems


def _refuse_unsupported(args: DistillConfig) -> None:
    problems = per_row_teacher_problems(args, explained=True)
    if problems:
        raise ValueError(
            "Cross-tokenizer distillation (the teacher's tokenizer differs from the student's) does not support "
            + "; ".join(problems)
            + ". Change these settings, or use a teacher of the student's tokenizer."
        )

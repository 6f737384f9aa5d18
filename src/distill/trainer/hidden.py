"""Intermediate-layer distillation in the trainer: which layers are matched, and how the widths meet.

Resolved once, before training, from the ``hidden_*`` fields of :class:`~distill.DistillConfig`:

* The layer map: pairs ``(student layer, teacher layer)``: the residual stream after the student
  layer is matched to the one after the teacher layer. ``auto`` reads the pruning record a pruned
  student carries in ``config.distill_pruning`` (student layer ``i`` is a pruned copy of teacher
  layer ``layers[i]``), else spreads the student's layers evenly over the teacher's depth.
* The projection: a record that kept a subset of the teacher's hidden channels makes the student's
  channel ``j`` the teacher's channel ``hidden_channels[j]``, so the teacher's states are *selected*
  (exact, no parameters); equal widths need nothing; otherwise a linear map per mapped layer takes
  the student's states to the teacher's width. The learned maps are trained with the student (a
  parameter group of the trainer's optimizer) but are not part of it: they are not saved with the
  student, only in checkpoints (``hidden_projections.pt``), so a resume continues them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DistillConfig, parse_layer_map
from distill.losses import HiddenStateOutput, hidden_state_loss
from distill.models.decoder import decoder_of
from distill.models.shrink import PRUNING_RECORD_KEY
from distill.teachers import Teacher, decoder_layers
from distill.trainer.batching import IGNORE_INDEX

__all__ = [
    "PROJECTIONS_FILE",
    "PRUNING_RECORD_KEY",
    "HiddenDistillation",
    "build_hidden_distillation",
    "evenly_spaced_map",
    "hidden_token_mask",
    "pruning_record",
]

logger = logging.getLogger(__name__)

PROJECTIONS_FILE = "hidden_projections.pt"


def pruning_record(model: nn.Module) -> dict[str, Any] | None:
    """The pruning record in the model's config (``config.distill_pruning``), or ``None``."""
    record = getattr(decoder_of(model).config, PRUNING_RECORD_KEY, None)
    return dict(record) if record else None


def evenly_spaced_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Each student layer to the teacher layer at the same relative depth: ``(i + 1) / S ~ (j + 1) / T``.

    The last student layer meets the last teacher layer; e.g. 2 student and 4 teacher layers give
    ``[(0, 1), (1, 3)]``.
    """
    return [(i, max(0, round((i + 1) * teacher_layers / student_layers) - 1)) for i in range(student_layers)]


def _record_map(record: dict[str, Any], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    layers = list(record.get("layers") or [])
    recorded_teacher = record.get("teacher_num_hidden_layers")
    if len(layers) != student_layers or (recorded_teacher is not None and recorded_teacher != teacher_layers):
        raise ValueError(
            f"The student's pruning record (config.{PRUNING_RECORD_KEY}) maps {len(layers)} layers of a "
            f"{recorded_teacher}-layer teacher, but the student has {student_layers} layers and the teacher "
            f"{teacher_layers}: was it pruned from another model? Pass the teacher it was pruned from, or set "
            "hidden_layer_map explicitly ('student:teacher' pairs)."
        )
    return [(i, int(j)) for i, j in enumerate(layers)]


def _record_channels(record: dict[str, Any] | None, student_width: int, teacher_width: int) -> list[int] | None:
    channels = None if record is None else record.get("hidden_channels")
    if channels is None:
        return None
    channels = [int(c) for c in channels]
    recorded_width = record.get("teacher_hidden_size", teacher_width)  # type: ignore[union-attr]
    if (
        len(channels) != student_width
        or recorded_width != teacher_width
        or channels != sorted(set(channels))
        or not 0 <= channels[0] <= channels[-1] < teacher_width
    ):
        raise ValueError(
            f"The student's pruning record keeps {len(channels)} hidden channels of a {recorded_width}-wide teacher "
            f"(sorted, distinct, in range expected), but the student is {student_width} wide and the teacher "
            f"{teacher_width}. Pass the teacher it was pruned from, or set hidden_projection='learned'."
        )
    return channels


def _projection_mode(
    requested: str, channels: list[int] | None, student_width: int, teacher_width: int
) -> tuple[str, list[int] | None]:
    """``("select" | "identity" | "learned", channels)`` from ``hidden_projection`` and the record."""
    if requested == "learned":
        return "learned", None
    if requested == "auto" and channels is not None:
        return ("identity", None) if channels == list(range(teacher_width)) else ("select", channels)
    if student_width == teacher_width:
        return "identity", None
    if requested == "none":
        raise ValueError(
            f"hidden_projection='none' compares states as they are, but the student is {student_width} wide and the "
            f"teacher {teacher_width}. Use hidden_projection='auto' (a learned map, or a pruning record's channel "
            "selection) or 'learned'."
        )
    return "learned", None


class HiddenDistillation(nn.Module):
    """The hidden-state term of one run: layer pairs, projections and the loss settings.

    Args:
        pairs: ``(student layer, teacher layer)`` pairs; the teacher's states arrive in this order.
        kind: ``"cosine"`` or ``"mse"`` (see :mod:`distill.losses.hidden`).
        mode: ``"identity"``, ``"select"`` (teacher channels ``channels``) or ``"learned"``.
        student_width, teacher_width: hidden sizes ``H_s`` and ``H_t``.
        channels: the teacher's hidden channels the student keeps (``mode="select"``).
        seed: seeds the learned maps' initialisation (the same maps whatever ran before).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        kind: str,
        mode: str,
        student_width: int,
        teacher_width: int,
        channels: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.kind, self.mode = kind, mode
        self.student_layers = tuple(s for s, _ in self.pairs)
        self.teacher_layers = tuple(t for _, t in self.pairs)
        self.names = [f"hidden_loss/layer_{s}" for s in self.student_layers]
        self.projections: nn.ModuleList | None = None
        if mode == "learned":
            self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in self.pairs)
            generator = torch.Generator().manual_seed(seed)
            for projection in self.projections:
                # Semi-orthogonal: preserves the student's norms (H_t >= H_s) or projects them onto a subspace, so
                # the relative MSE starts near the value of the unprojected states and the cosine is well defined.
                nn.init.orthogonal_(projection.weight, generator=generator)
        if mode == "select":
            self.register_buffer("channels", torch.tensor(list(channels or ()), dtype=torch.long), persistent=False)

    def describe(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for s, t in self.pairs)
        return f"hidden-state loss ({self.kind}) on student->teacher layers {pairs}; projection: {self.mode}"

    def forward(
        self, student_states: dict[int, Tensor], teacher_states: Sequence[Tensor], mask: Tensor | None
    ) -> HiddenStateOutput:
        """The loss from the caught student layer outputs and the teacher's ``layer_states``.

        Args:
            student_states: ``{student layer: [batch, seq, H_s]}``, caught by
                :func:`~distill.teachers.catch_layer_outputs`.
            teacher_states: ``[batch, seq, H_t]`` per pair, in pair order.
            mask: ``[batch, seq]`` bool, the tokens that count.

        Returns:
            :class:`~distill.losses.HiddenStateOutput`.
        """
        missing = [s for s in self.student_layers if s not in student_states]
        if missing or len(teacher_states) != len(self.pairs):
            raise RuntimeError(
                f"Hidden states missing: student layers {missing} not caught, or {len(teacher_states)} teacher "
                f"states for {len(self.pairs)} pairs. Did the student's forward run inside catch_layer_outputs, and "
                "was the teacher asked for its states (request_hidden_states)?"
            )
        students, teachers = [], []
        for index, (student_layer, _) in enumerate(self.pairs):
            student, teacher = student_states[student_layer], teacher_states[index]
            if self.projections is not None:
                projection = self.projections[index]
                student = projection(student.to(projection.weight.device, projection.weight.dtype))
            elif self.mode == "select":
                teacher = teacher.index_select(-1, self.channels.to(teacher.device))
            students.append(student)
            teachers.append(teacher.to(student.device))
        return hidden_state_loss(students, teachers, mask, kind=self.kind)


def hidden_token_mask(which: str, attention_mask: Tensor | None, targets: Tensor) -> Tensor:
    """``[batch, seq]`` bool: the tokens the hidden-state loss counts.

    Args:
        which: ``"completion"`` (positions the logit loss counts: ``targets != -100``) or ``"all"``
            (every non-padding token).
        attention_mask: ``[batch, seq]`` 1 real / 0 padding (``None`` in packed batches).
        targets: ``[batch, seq]`` next-token labels, ``-100`` where the logit loss does not count.
    """
    if which == "completion":
        return targets != IGNORE_INDEX
    if attention_mask is None or attention_mask.dim() != 2:
        raise ValueError("hidden_loss_tokens='all' needs a 2D attention mask (not packed rows); use 'completion'.")
    return attention_mask.bool()


def build_hidden_distillation(student: nn.Module, teacher: Teacher, args: DistillConfig) -> HiddenDistillation | None:
    """The run's :class:`HiddenDistillation` (``None`` when ``hidden_loss_weight`` is 0); refuses bad setups now.

    Asks the teacher for its mapped layers' states (a teacher without hidden states refuses here).
    """
    if args.hidden_loss_weight == 0:
        return None
    teacher_layers, teacher_width = teacher.hidden_state_shape()
    student_layers = len(decoder_layers(student))
    student_width = int(decoder_of(student).config.hidden_size)
    record = pruning_record(student)
    if args.hidden_layer_map != "auto":
        pairs = parse_layer_map(args.hidden_layer_map)
    elif record is not None:
        pairs = _record_map(record, student_layers, teacher_layers)
    else:
        pairs = evenly_spaced_map(student_layers, teacher_layers)
    bad = [(s, t) for s, t in pairs if s >= student_layers or t >= teacher_layers]
    if bad:
        raise ValueError(
            f"hidden_layer_map pairs {bad} are out of range: the student has {student_layers} layers and the teacher "
            f"{teacher_layers} (0-based indices)."
        )
    channels = _record_channels(record, student_width, teacher_width)
    mode, channels = _projection_mode(args.hidden_projection, channels, student_width, teacher_width)
    teacher.request_hidden_states(tuple(t for _, t in pairs))
    hidden = HiddenDistillation(pairs, args.hidden_loss, mode, student_width, teacher_width, channels, args.seed)
    logger.info("%s", hidden.describe())
    return hidden

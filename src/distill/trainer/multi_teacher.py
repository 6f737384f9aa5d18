"""Several teachers for one student: a weighted mixture per token, or per-example routing by a dataset column.

Each teacher is a *route*: its :class:`~distill.teachers.Teacher`, and, when its tokenizer differs from the
student's, its :class:`~distill.trainer.cross_tokenizer.CrossTokenizer` (own chat template, alignment and
vocabulary map, own batch columns). The student runs once per micro-batch; each teacher's KD term is then
computed from the same hidden states.

* Mixture (``teacher_weights``, default equal): ``sum_i w_i * KD_i + CE`` at every loss token. For the
  forward KL this is exactly the KL to the mixture ``sum_i w_i p_i`` (up to a constant: the KL is linear in
  the teacher's distribution), and it is defined across tokenizers, where a per-token mixture of
  distributions over different vocabularies is not.
* Routing (``teacher_route_column``): each row names its teacher (by name or index); a row's KD comes from
  that teacher only, and the total is the token-weighted mean over all rows. A teacher no row of the
  micro-batch is routed to does not run.

Metrics per teacher go to the log as ``kd_loss/<name>`` and ``top1_agreement/<name>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DistillConfig
from distill.losses import DistillationOutput, NonFiniteInputError, Objective
from distill.losses.fused import fused_objective_loss
from distill.models import shared_vocab_size
from distill.models.decoder import final_hidden_states, output_head_of
from distill.teachers import Teacher, TeacherTargets
from distill.teachers.server import ServerError
from distill.teachers.sharding import student_head
from distill.trainer.batching import IGNORE_INDEX, next_token_labels
from distill.trainer.cross_tokenizer import Columns, CrossTokenizer, per_row_teacher_problems, uses_cross_tokenizer

__all__ = ["ROUTE_KEY", "Route", "TeacherEnsemble", "named_teachers"]

ROUTE_KEY = "xt_route"


def named_teachers(teacher: Any, tokenizers: Any) -> tuple[list[str], list[Any], list[Any]]:
    """``(names, teachers, tokenizers)`` from a list or a ``{name: teacher}`` dict (tokenizers alike, or None)."""
    if isinstance(teacher, dict):
        names, teachers = list(teacher), list(teacher.values())
        if isinstance(tokenizers, dict):
            tokenizers = [tokenizers.get(name) for name in names]
    else:
        teachers = list(teacher)
        names = [f"teacher{index}" for index in range(len(teachers))]
    tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(teachers)
    if len(tokenizers) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(tokenizers)} teacher tokenizers: give one per teacher.")
    return names, teachers, tokenizers


@dataclass
class Route:
    """One teacher of the ensemble: its name, the teacher, its cross-tokenizer setup (or None) and weight."""

    name: str
    teacher: Teacher
    cross: CrossTokenizer | None
    weight: float


class TeacherEnsemble:
    """The teachers of a multi-teacher run, their data columns and the combined loss.

    Args:
        names: one name per teacher (the log's ``kd_loss/<name>``; what a route column may hold).
        tokenizers: each teacher's tokenizer (required: it decides same- or cross-tokenizer distillation).
        student_tokenizer: the student's.
        args: the run's config (``teacher_weights``, ``teacher_route_column``, ``cross_tokenizer``, ...).
    """

    def __init__(self, names: list[str], tokenizers: list[Any], student_tokenizer: Any, args: DistillConfig) -> None:
        if any(tokenizer is None for tokenizer in tokenizers):
            raise ValueError("Several teachers need teacher_processing_class: a list (or dict) with each's tokenizer.")
        _refuse_unsupported(args)
        weights = args.teacher_weights or [1.0 / len(names)] * len(names)
        if len(weights) != len(names) or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"teacher_weights must be {len(names)} numbers >= 0, not all 0; got {weights}.")
        self.names, self.tokenizers, self.args, self.student_tokenizer = names, tokenizers, args, student_tokenizer
        self.crosses = [
            CrossTokenizer(student_tokenizer, tokenizer, args, Columns(f"t{index}_"))
            if uses_cross_tokenizer(args, student_tokenizer, tokenizer)
            else None
            for index, tokenizer in enumerate(tokenizers)
        ]
        self.weights = [w / sum(weights) for w in weights]
        self.routes: list[Route] = []
        self.vocab_size: int | None = None

    def add_columns(self, prepared: Any, raw: Any) -> Any:
        """Each cross-tokenizer teacher's columns, and the route index of each row when routing."""
        for cross in self.crosses:
            if cross is not None:
                prepared = cross.add_teacher_columns(prepared, raw)
        column = self.args.teacher_route_column
        if column:
            if column not in raw.column_names:
                raise ValueError(
                    f"teacher_route_column={column!r} is not a column of the dataset ({raw.column_names})."
                )
            prepared = prepared.add_column(ROUTE_KEY, [self._route_index(value) for value in raw[column]])
        return prepared

    def _route_index(self, value: Any) -> int:
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if isinstance(value, int) and 0 <= value < len(self.names):
            return value
        raise ValueError(f"A row's teacher {value!r} is none of the teachers {self.names} (or their indices).")

    def bind(self, teachers: list[Teacher], student: nn.Module) -> None:
        """Attach the resolved teachers; check each one's vocabulary (same-tokenizer) or fix its projection."""
        student_rows = int(student.get_output_embeddings().weight.shape[0])
        for name, teacher, cross, tokenizer, weight in zip(
            self.names, teachers, self.crosses, self.tokenizers, self.weights, strict=True
        ):
            if cross is None:
                shared = shared_vocab_size(self.student_tokenizer, tokenizer, student_rows, teacher.vocab_rows)
                self.vocab_size = shared if self.vocab_size is None else min(self.vocab_size, shared)
            else:
                cross.check_teacher(teacher)
                cross.bind(student_rows, teacher.vocab_rows)
            self.routes.append(Route(name, teacher, cross, weight))

    def collator(self, base: Any) -> Any:
        for cross in self.crosses:
            if cross is not None:
                base = cross.collator(base)
        return _RouteCollator(base) if self.args.teacher_route_column else base

    def teacher_rows(self, index: int, prepared: Any) -> Any:
        """The rows teacher ``index`` sees (its own tokens when cross-tokenizer), for its checks."""
        cross = self.crosses[index]
        return prepared if cross is None else cross.teacher_rows(prepared)

    @property
    def remote(self) -> bool:
        """Whether some teacher answers from elsewhere (a server: it can fail on one process and not the others)."""
        return any(route.teacher.prefetchable for route in self.routes)

    def targets(self, inputs: dict[str, Any]) -> tuple[list[TeacherTargets | None], str | None]:
        """Every teacher's targets for the micro-batch, asked for before the student runs; and what failed, if any.

        A teacher server that fails after its retries is reported, not raised, and the other teachers are still
        asked (their collectives, if sharded, run on every process alike), so that the trainer can stop every
        process together (:mod:`distill.trainer.agreement`). Routing: a teacher no row is routed to is skipped
        (``None``).

        Returns:
            ``(targets, problem)``: one entry per teacher (``None`` where it did not run or failed), and
            ``"teacher 'name': <error>"`` for each teacher that failed (``None`` when none did).
        """
        route = inputs.get(ROUTE_KEY)
        results: list[TeacherTargets | None] = []
        problems = []
        for index, route_spec in enumerate(self.routes):
            if route is not None and not bool((route == index).any()):  # host-device sync: no row for this teacher
                results.append(None)
                continue
            try:
                results.append(self._teacher_targets(route_spec, inputs))
            except ServerError as error:
                results.append(None)
                problems.append(f"teacher {route_spec.name!r}: {error}")
        return results, "; ".join(problems) or None

    @staticmethod
    def _teacher_targets(route: Route, inputs: dict[str, Any]) -> TeacherTargets:
        if route.cross is not None:
            return route.cross.teacher_targets(route.teacher, inputs)
        return route.teacher.targets(inputs["input_ids"], inputs["attention_mask"], None)

    def loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        objective: Objective,
        teacher_targets: list[TeacherTargets | None] | None = None,
    ) -> tuple[DistillationOutput, dict[str, tuple[int, Tensor | float, Tensor | float]]]:
        """The combined loss of one micro-batch, and per teacher that ran ``(tokens, KD, top-1 agreement)``.

        ``teacher_targets``: what :meth:`targets` returned for this micro-batch (each teacher is asked here when
        not given).
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = final_hidden_states(model, input_ids, attention_mask, None)
        targets = next_token_labels(inputs["labels"])
        route = inputs.get(ROUTE_KEY)
        total_tokens = int((targets != IGNORE_INDEX).sum())  # host-device sync: each teacher's share of the tokens
        outputs, metrics = [], {}
        for index, route_spec in enumerate(self.routes):
            if route is None:
                labels = targets
                settings = dict(kd_weight=objective.kd_weight * route_spec.weight,
                                ce_weight=objective.ce_weight if index == 0 else 0.0)  # fmt: skip
            else:
                labels = targets.masked_fill((route != index)[:, None].to(targets.device), IGNORE_INDEX)
                settings = {}
                if not bool((labels != IGNORE_INDEX).any()):  # host-device sync: skip a teacher with no rows here
                    metrics[route_spec.name] = (0, 0.0, 0.0)  # every teacher keeps a key (processes sum them)
                    continue
            given = None if teacher_targets is None else teacher_targets[index]
            try:
                output = self._teacher_loss(model, inputs, route_spec, dataclasses.replace(objective, **settings),
                                            hidden, labels, given)  # fmt: skip
            except NonFiniteInputError as error:  # say which teacher: the trainer's message names the rank
                raise NonFiniteInputError(f"teacher {route_spec.name!r}: {error}") from error
            token_share = output.num_tokens / max(total_tokens, 1)
            # Mixture: the weights are inside kd_weight; routing: each teacher's mean counts by its tokens.
            outputs.append(
                (output, 1.0 if route is None else token_share, route_spec.weight if route is None else token_share)
            )
            metrics[route_spec.name] = (output.num_tokens, output.kd_loss, output.top1_agreement)  # tensors: no sync
        return _combine(outputs, total_tokens), metrics

    def _teacher_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        route: Route,
        objective: Objective,
        hidden: Tensor,
        labels: Tensor,
        teacher_targets: TeacherTargets | None,
    ) -> DistillationOutput:
        if teacher_targets is None:
            teacher_targets = self._teacher_targets(route, inputs)
        if route.cross is not None:
            return route.cross.loss(model, inputs, teacher_targets, objective, hidden=hidden, targets=labels)
        return fused_objective_loss(
            hidden, student_head(output_head_of(model)), teacher_targets, labels,
            dataclasses.replace(objective, vocab_size=self.vocab_size),  # the rows all the ensemble's heads share
            chunk_size=self.args.loss_chunk_size,
        )  # fmt: skip


class _RouteCollator:
    """Adds ``xt_route`` ``[B]`` (each row's teacher index) to the wrapped collator's batch."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(rows)
        batch[ROUTE_KEY] = torch.tensor([int(row[ROUTE_KEY]) for row in rows], dtype=torch.long)
        return batch


def _combine(outputs: list[tuple[DistillationOutput, float, float]], total_tokens: int) -> DistillationOutput:
    """One output from the teachers' ``(output, loss share, metric weight)``: losses summed, metrics averaged."""
    loss = sum(share * output.loss for output, share, _ in outputs)
    norm = max(sum(weight for _, _, weight in outputs), 1e-12)

    def mean(name: str) -> Tensor:
        return sum(weight * getattr(output, name) for output, _, weight in outputs) / norm

    entropies = all(output.teacher_entropy is not None for output, _, _ in outputs)
    return DistillationOutput(
        loss, kd_loss=mean("kd_loss"), ce_loss=mean("ce_loss"), top1_agreement=mean("top1_agreement"),
        num_tokens=total_tokens, teacher_entropy=mean("teacher_entropy") if entropies else None,
    )  # fmt: skip


def _refuse_unsupported(args: DistillConfig) -> None:
    problems = per_row_teacher_problems(args, explained=False)
    if args.teacher_sharding == "fsdp":
        problems.append("teacher_sharding='fsdp'")
    if problems:
        raise ValueError(
            "Several teachers do not support "
            + "; ".join(problems)
            + " yet. Change these settings, or use one teacher."
        )

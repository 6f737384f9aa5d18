"""Prune a teacher to a target: an explicit shape, or a parameter budget met by the best of several shapes.

For a budget, candidate shapes mix depth and width (fewer layers, narrower hidden size, fewer query
heads per KV group), each completed with the largest MLP that fits; every candidate is cut and scored
by its calibration loss, and the lowest wins. Small models lose far more to depth cuts than to width
cuts (``docs/pruning.md``), and which width mix is best depends on the model: measuring is cheaper
than guessing, and the table says why a shape was picked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.data import DistillCollator, prepare_dataset
from distill.pruning.architecture import PruneShape, check_prunable, count_parameters, shape_of
from distill.pruning.importance import calibration_loss, measure_importance
from distill.pruning.surgery import PrunedModel, check_shape, prune_to_shape, pruned_config

__all__ = ["Candidate", "PruneResult", "calibration_batches", "candidate_shapes", "prune"]

BudgetOf = Literal["non_embedding", "total"]
# The least-squares re-fit's ridge, relative to the mean Gram diagonal: the best value falls with more calibration
# tokens (measured on SmolLM2-135M: 1e-2 best with 8k tokens, 1e-3 with 24k), so it is chosen on held-out batches.
DEFAULT_DAMPING = 1e-2
DAMPINGS = (1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class Candidate:
    """One shape tried for a budget, with its parameters and calibration loss (nats/token)."""

    shape: PruneShape
    parameters: int
    calibration_loss: float
    seconds: float


@dataclass
class PruneResult:
    """The outcome of :func:`prune`.

    Attributes:
        pruned: the student and its record.
        teacher_parameters / student_parameters: ``{"embedding", "non_embedding", "total"}`` counts.
        teacher_loss / student_loss: calibration CE (nats/token) before and after pruning.
        candidates: every shape tried (one for an explicit shape), best first.
        reason: one line on why this shape was picked.
        seconds: wall-clock time of the whole pruning, and of the importance pass.
    """

    pruned: PrunedModel
    teacher_parameters: dict[str, int]
    student_parameters: dict[str, int]
    teacher_loss: float
    student_loss: float
    candidates: list[Candidate]
    reason: str
    seconds: dict[str, float]

    def table(self) -> str:
        """A markdown summary: parameters and calibration loss before/after, time, and the candidates."""
        t, s = self.teacher_parameters, self.student_parameters
        lines = [
            "| | parameters | non-embedding | calibration CE (nats/token) |",
            "|---|---:|---:|---:|",
            f"| teacher | {t['total'] / 1e6:.1f}M | {t['non_embedding'] / 1e6:.1f}M | {self.teacher_loss:.3f} |",
            f"| pruned ({self.pruned.shape}) | {s['total'] / 1e6:.1f}M | {s['non_embedding'] / 1e6:.1f}M "
            f"({s['non_embedding'] / t['non_embedding']:.1%}) | {self.student_loss:.3f} |",
        ]
        if len(self.candidates) > 1:
            lines += ["", "| candidate shape | non-embedding | calibration CE | s |", "|---|---:|---:|---:|"]
            lines += [
                f"| {c.shape} | {c.parameters / 1e6:.1f}M | {c.calibration_loss:.3f} | {c.seconds:.1f} |"
                for c in self.candidates
            ]
        lines += ["", self.reason, f"Time: {self.seconds['total']:.0f} s ({self.seconds['importance']:.0f} s "
                  "calibration pass)."]  # fmt: skip
        return "\n".join(lines)

    def save(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """``save_pretrained`` the student (and tokenizer) to ``folder``, plus ``pruning.json`` (record + table)."""
        folder = Path(folder)
        self.pruned.model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        summary = {
            "record": self.pruned.record,
            "teacher_parameters": self.teacher_parameters,
            "student_parameters": self.student_parameters,
            "teacher_calibration_loss": self.teacher_loss,
            "student_calibration_loss": self.student_loss,
            "candidates": [
                {"shape": c.shape.as_dict(), "parameters": c.parameters, "calibration_loss": c.calibration_loss}
                for c in self.candidates
            ],
            "reason": self.reason,
            "seconds": self.seconds,
        }
        (folder / "pruning.json").write_text(json.dumps(summary, indent=1) + "\n")
        return folder


def calibration_batches(
    rows: Any, tokenizer: Any, *, max_length: int = 512, batch_size: int = 8, max_rows: int | None = None
) -> list[dict[str, Tensor]]:
    """Collated batches from calibration rows in any layout the trainer takes (``text``, chat ``messages``, ...).

    Every token counts (``completion_only_loss=False``): importance is about the model, not the task's labels.

    Args:
        rows: a ``datasets.Dataset`` or a list of dicts.
        tokenizer: the teacher's tokenizer.
        max_length: longest row in tokens (longer rows are cut).
        batch_size: rows per batch.
        max_rows: use at most this many rows (the first ones).
    """
    if isinstance(rows, list):
        rows = datasets.Dataset.from_list(rows)
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        raise ValueError("No calibration rows: pass at least one row (a few hundred thousand tokens is typical).")
    prepared, _ = prepare_dataset(rows, tokenizer, max_length=max_length, completion_only_loss=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DistillCollator(pad_token_id=pad)
    items = [prepared[i] for i in range(len(prepared))]
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]  # type: ignore[misc]


def _round_down(value: float, multiple: int) -> int:
    return int(value // multiple) * multiple


def candidate_shapes(
    config: Any, budget: int, *, budget_of: BudgetOf = "non_embedding", multiple: int | None = None
) -> list[PruneShape]:
    """Shapes mixing depth and width that fit ``budget`` parameters, each with the largest MLP that fits.

    Depth: all layers or 90%; query heads per KV group: all or 2/3; hidden size: all or about 7/8 (a
    multiple of ``multiple`` and of the head count, at least 60% of the teacher's). Below 40% of the
    teacher's parameters also 80% depth, 1/3 of the heads and 3/4 of the hidden size. The MLP width is then
    the largest multiple of ``multiple`` within the budget (a candidate needing less than 10% of the
    teacher's MLP is dropped, and so is a shape the model's config class refuses). ``multiple`` defaults to
    a power of two near ``hidden / 16`` (at most 64).
    """
    full = shape_of(config)
    if multiple is None:  # tensor-core friendly sizes: a power of two near hidden/16, between 1 and 64
        multiple = min(64, 2 ** max(0, int(math.log2(max(full.hidden_size / 16, 1)))))
    per_group = full.num_attention_heads // full.num_key_value_heads
    deep_cut = budget < 0.4 * count_parameters(config)[budget_of]  # below 40%: also try harder width/depth cuts
    depth_fractions, head_fractions, hidden_fractions = (1.0, 0.9), (1.0, 2 / 3), (7 / 8,)
    if deep_cut:
        depth_fractions, head_fractions, hidden_fractions = (1.0, 0.9, 0.8), (1.0, 2 / 3, 1 / 3), (7 / 8, 3 / 4)
    depths = sorted({max(1, round(f * full.num_layers)) for f in depth_fractions}, reverse=True)
    groups = sorted({max(1, round(per_group * f)) for f in head_fractions}, reverse=True)
    shapes = []
    for depth in depths:
        for heads_per_group in groups:
            step = math.lcm(multiple, heads_per_group * full.num_key_value_heads)
            narrower = {_round_down(full.hidden_size * f, step) for f in hidden_fractions}
            hiddens = [full.hidden_size] + sorted(
                (h for h in narrower if 0.6 * full.hidden_size <= h < full.hidden_size), reverse=True
            )
            for hidden in hiddens:
                base = dataclasses.replace(
                    full, num_layers=depth, hidden_size=hidden,
                    num_attention_heads=heads_per_group * full.num_key_value_heads, intermediate_size=0,
                )  # fmt: skip
                fixed = count_parameters(config, base)[budget_of]
                one_neuron = dataclasses.replace(base, intermediate_size=1)
                per_neuron = count_parameters(config, one_neuron)[budget_of] - fixed
                width = min(full.intermediate_size, _round_down((budget - fixed) / per_neuron, multiple))
                shape = dataclasses.replace(base, intermediate_size=width)
                if width >= max(1, full.intermediate_size // 10) and _accepted(config, shape):
                    shapes.append(shape)
    return shapes


def _accepted(config: Any, shape: PruneShape) -> bool:
    try:
        pruned_config(config, shape, list(range(shape.num_layers)))
    except ValueError:
        return False
    return True


def resolve_target(
    config: Any, target: PruneShape | dict[str, int] | float | int, budget_of: BudgetOf
) -> tuple[PruneShape | None, int | None]:
    """``(shape, None)`` for an explicit shape, or ``(None, budget)`` for a parameter budget (a fraction in
    (0, 1) of the teacher's, or a count); ``ValueError`` / ``TypeError`` for a target that cannot be met."""
    full = shape_of(config)
    if isinstance(target, dict):
        unknown = set(target) - set(full.as_dict())
        if unknown:
            raise ValueError(f"Unknown shape fields {sorted(unknown)}; use {sorted(full.as_dict())}.")
        target = dataclasses.replace(full, **target)
    if isinstance(target, PruneShape):
        check_shape(full, target, config)
        return target, None
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise TypeError(f"target must be a shape, a dict of shape fields, a fraction or a count; got {target!r}.")
    teacher_count = count_parameters(config)[budget_of]
    if not (0 < target < 1 or 1 <= target < teacher_count):  # NaN fails both
        raise ValueError(
            f"A budget is a fraction in (0, 1) of the teacher's {budget_of} parameters ({teacher_count:,}) or a "
            f"count below it; got {target!r}."
        )
    budget = int(target * teacher_count) if target < 1 else int(target)
    if not candidate_shapes(config, budget, budget_of=budget_of):
        raise ValueError(
            f"No shape fits {budget:,} {budget_of} parameters (teacher: {teacher_count:,}) with at least 90% of the "
            "layers and 7/8 of the hidden size; pass an explicit shape for deeper cuts."
        )
    return None, budget


def prune(
    model: nn.Module,
    calibration: list[dict[str, Tensor]],
    target: PruneShape | dict[str, int] | float | int,
    *,
    budget_of: BudgetOf = "non_embedding",
    candidates: Sequence[PruneShape] | None = None,
    score_batches: int = 2,
    skip_loss_batches: int = 0,
    refit: bool = True,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` (left unchanged) to ``target`` using calibration batches; see the module docstring.

    Args:
        model: a supported causal LM (:func:`~distill.pruning.architecture.check_prunable`).
        calibration: batches from :func:`calibration_batches`.
        target: a :class:`PruneShape` or a dict of its fields (the rest stay the teacher's), or a budget:
            a fraction in (0, 1) of the teacher's parameters, or a parameter count.
        budget_of: which parameters a budget counts: ``"non_embedding"`` or ``"total"``.
        candidates: shapes to try for a budget (default :func:`candidate_shapes`).
        score_batches: calibration batches each candidate is scored on (the last ones, held out of the
            importance statistics when there are more batches than this).
        skip_loss_batches: also rank blocks by the loss with the block skipped, on this many batches.
        refit: least-squares re-fit of kept weights (see :mod:`distill.pruning.surgery`).
        progress: progress bars.
    """
    check_prunable(model)
    shape, budget = resolve_target(model.config, target, budget_of)  # bad targets fail before any work
    if score_batches < 1:
        raise ValueError(f"score_batches must be at least 1; got {score_batches}.")
    if not calibration:
        raise ValueError("No calibration batches: pass calibration_batches(rows, tokenizer) with at least one row.")
    # Candidates are scored on batches the re-fit never saw (when there are enough): an in-sample score
    # would favour the shapes that over-fit the calibration statistics.
    scoring = calibration[-score_batches:]
    fitting = calibration[:-score_batches] if len(calibration) > score_batches else calibration
    started = time.perf_counter()
    importance = measure_importance(model, fitting, grams=refit, skip_loss_batches=skip_loss_batches,
                                    progress=progress)  # fmt: skip
    importance_seconds = time.perf_counter() - started
    teacher_loss = calibration_loss(model, scoring)
    if shape is not None:
        tried = [shape]
    else:
        tried = list(candidates or candidate_shapes(model.config, budget, budget_of=budget_of))
    results: list[tuple[Candidate, PrunedModel]] = []
    for candidate in tqdm(tried, desc="Candidate shapes", unit="shape", disable=not progress or len(tried) == 1):
        t0 = time.perf_counter()
        pruned = prune_to_shape(model, importance, candidate, refit=refit)
        loss = calibration_loss(pruned.model, scoring)
        parameters = count_parameters(model.config, candidate)[budget_of]
        results.append((Candidate(candidate, parameters, loss, time.perf_counter() - t0), pruned))
        if len(results) > 1:  # keep only the best model in memory
            results.sort(key=lambda item: item[0].calibration_loss)
            results[1] = (results[1][0], None)  # type: ignore[assignment]
    results.sort(key=lambda item: item[0].calibration_loss)
    best, pruned_best = results[0]
    damping = DEFAULT_DAMPING
    if refit and len(scoring) < len(calibration):  # the re-fit's ridge, chosen on the held-out batches too
        others = [other for other in DAMPINGS if other != DEFAULT_DAMPING]
        for other in tqdm(others, desc="Re-fit damping", unit="fit", disable=not progress):
            pruned = prune_to_shape(model, importance, best.shape, refit=True, damping=other)
            loss = calibration_loss(pruned.model, scoring)
            if loss < best.calibration_loss:
                best = dataclasses.replace(best, calibration_loss=loss)
                pruned_best, damping = pruned, other
        results[0] = (best, pruned_best)
    return PruneResult(
        pruned=pruned_best,
        teacher_parameters=count_parameters(model.config),
        student_parameters=count_parameters(model.config, best.shape),
        teacher_loss=teacher_loss,
        student_loss=best.calibration_loss,
        candidates=[c for c, _ in results],
        reason=_reason(results, budget, budget_of) + (f" Re-fit damping {damping:g}." if refit else ""),
        seconds={"total": time.perf_counter() - started, "importance": importance_seconds},
    )


def _reason(results: list[tuple[Candidate, Any]], budget: int | None, budget_of: str) -> str:
    best = results[0][0]
    if budget is None:
        return f"Explicit shape: {best.shape}."
    line = (
        f"Picked {best.shape}: the lowest calibration loss ({best.calibration_loss:.3f}) of {len(results)} shapes "
        f"within {budget:,} {budget_of.replace('_', '-')} parameters"
    )
    if len(results) > 1:
        runner = results[1][0]
        line += f"; next best {runner.shape} at {runner.calibration_loss:.3f}"
    return line + "."

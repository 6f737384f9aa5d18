"""Evaluation and the report card: how much of the teacher's quality a student keeps, and what it saves.

* :func:`heldout_metrics`: forward KL, top-1 agreement, cross-entropy and perplexity of a student and
  its teacher on held-out rows (any layout the Trainer accepts), chunked over tokens;
  :func:`heldout_metrics_per_student` scores several students with one teacher pass per batch.
* :class:`TaskMetric` and :class:`HumanEvalPassAtK`: task scores; code pass@k with the unbiased
  estimator (:func:`pass_at_k`), tests run in :mod:`distill.sandbox`.
* :func:`measure_speed`: generation tokens/s, parameter bytes, peak memory, $ per million tokens.
* :func:`write_report`: ``report.md``, ``report.json`` and plots, headed by "The student keeps X% of
  the teacher's quality at Y% of its size, Zx faster, $W per million tokens instead of $V".

The ``distill eval`` command runs all of it; see ``docs/evaluation.md``.

Example:
    >>> from distill.evaluation import ModelResult, heldout_metrics, measure_speed, write_report
    >>> heldout = heldout_metrics(student, teacher, tokenizer, "heldout.jsonl")
    >>> card = write_report(
    ...     "report/",
    ...     teacher=ModelResult.from_results("teacher", heldout.teacher_metrics(), speed=measure_speed(teacher, tok)),
    ...     student=ModelResult.from_results("student", heldout.student_metrics(), speed=measure_speed(student, tok)),
    ... )
    >>> print(card.headline)
"""

from typing import TYPE_CHECKING

from distill._lazy import lazy_exports

# Imported on first use: metrics and speed import torch, and ``distill eval --help`` should not wait for it.
if TYPE_CHECKING:
    from distill.evaluation.metrics import HeldoutMetrics, heldout_metrics, heldout_metrics_per_student, load_rows
    from distill.evaluation.passk import mean_pass_at_k, pass_at_k, per_problem_pass_at_k
    from distill.evaluation.report import (
        ModelResult,
        ReportCard,
        higher_is_better,
        kept,
        quality,
        summary_tables,
        write_report,
    )
    from distill.evaluation.speed import (
        SpeedResult,
        cost_per_million_tokens,
        gpu_price_per_hour,
        measure_speed,
        resolve_price,
    )
    from distill.evaluation.tasks import (
        HumanEvalPassAtK,
        PassAtKResult,
        Sampler,
        TaskMetric,
        humaneval_problems,
        run_tasks,
        sample_completions,
        task_problem_scores,
    )

__all__ = [
    "HeldoutMetrics",
    "HumanEvalPassAtK",
    "ModelResult",
    "PassAtKResult",
    "ReportCard",
    "Sampler",
    "SpeedResult",
    "TaskMetric",
    "cost_per_million_tokens",
    "gpu_price_per_hour",
    "heldout_metrics",
    "heldout_metrics_per_student",
    "higher_is_better",
    "humaneval_problems",
    "kept",
    "load_rows",
    "mean_pass_at_k",
    "measure_speed",
    "pass_at_k",
    "per_problem_pass_at_k",
    "quality",
    "resolve_price",
    "run_tasks",
    "sample_completions",
    "summary_tables",
    "task_problem_scores",
    "write_report",
]

__getattr__ = lazy_exports(__name__, ("metrics", "passk", "report", "speed", "tasks"), __all__)

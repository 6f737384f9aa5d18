"""The report card: quality kept vs cost saved, as ``report.md``, ``report.json`` and PNG plots.

Models come in as named entries (:class:`ModelResult`: teacher, KD student, optional baseline student)
holding metrics already computed, so a demo or a notebook can pass its own numbers.

Quality is defined per metric, and the headline names the one it uses:

* ``ce`` (cross-entropy on the reference completions, nats/token): quality is ``exp(-CE)``, the
  geometric-mean probability given to a reference token; kept = ``exp(CE_teacher - CE_student)``,
  which equals ``perplexity_teacher / perplexity_student``.
* ``perplexity``: the same, ``perplexity_teacher / perplexity_student``.
* task scores (``humaneval/pass@1``, ...; higher is better): kept = ``student / teacher``.
* ``kl`` and ``top1_agreement`` are measured against the teacher, so no "kept" ratio; they are shown
  as they are.

Every "better" or "worse" has its evidence beside it: the KD student and the baseline are compared on
the same rows with a paired bootstrap (:func:`distill.evaluation.stats.paired_difference`), and the
report gives the difference, its 95% interval and the number of rows and tokens; an interval that holds
0 reads "no clear difference", and a metric without per-row scores (task scores) gets no verdict.
Speeds are medians of repeated timed runs, with their range; a speed-up whose range holds 1 reads "no
clear speed difference".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.evaluation.plots import plot_quality_vs_cost, plot_training_curves, plots_unavailable
from distill.evaluation.speed import SpeedResult, cost_per_million_tokens
from distill.evaluation.stats import Interval, mean_interval, paired_difference, paired_score_difference, spread

__all__ = ["ModelResult", "ReportCard", "higher_is_better", "kept", "quality", "summary_tables", "write_report"]

_MB = 1e6
_LOWER_IS_BETTER = {"ce", "perplexity", "kl", "bits_per_byte"}
_AGAINST_TEACHER = {"kl", "top1_agreement"}
_UNITS = {
    "ce": "nats/token",
    "perplexity": "unitless",
    "kl": "nats/token",
    "top1_agreement": "fraction",
    "bits_per_byte": "bits/byte",
}
_DEFINITIONS = {
    "ce": "cross-entropy of the reference completion tokens (nats/token); quality = exp(-CE), kept = "
    "exp(CE_teacher - CE_student) = perplexity_teacher / perplexity_student",
    "perplexity": "exp(CE) on the reference completions; kept = perplexity_teacher / perplexity_student",
    "kl": "forward KL(teacher || student) per completion token (nats/token); 0 means the same distribution",
    "top1_agreement": "fraction of completion tokens where the student's most likely token is the teacher's",
    "bits_per_byte": "cross-entropy of the reference text per UTF-8 byte (bits/byte), comparable across tokenizers; "
    "quality = 2^-bpb, kept = 2^(bpb_teacher - bpb_student)",
}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False for ``ce``, ``perplexity``, ``kl``)."""
    return metric not in _LOWER_IS_BETTER


def quality(metric: str, value: float) -> float:
    """The value as "quality" (higher is better): ``exp(-ce)``, ``1 / perplexity``, ``2^-bits_per_byte``, or itself."""
    if metric == "ce":
        return math.exp(-value)
    if metric == "perplexity":
        return 1.0 / value
    if metric == "bits_per_byte":
        return 2.0**-value
    return value


def kept(metric: str, student_value: float, teacher_value: float) -> float | None:
    """Fraction of the teacher's quality the student keeps on ``metric`` (1.0 = all of it).

    ``ce``: ``exp(CE_t - CE_s)``; ``perplexity``: ``PPL_t / PPL_s``; ``bits_per_byte``: ``2^(bpb_t - bpb_s)``;
    task scores: ``student / teacher``.
    None for ``kl`` and ``top1_agreement`` (measured against the teacher) and when the teacher scores 0.
    """
    if metric in _AGAINST_TEACHER:
        return None
    teacher_quality = quality(metric, teacher_value)
    return quality(metric, student_value) / teacher_quality if teacher_quality > 0 else None


def _definition(metric: str) -> str:
    if metric in _DEFINITIONS:
        return _DEFINITIONS[metric]
    if "pass@" in metric:
        k = metric.rsplit("pass@", 1)[1]
        return (
            f"probability that at least one of k={k} sampled programs passes the problem's tests, averaged over "
            "problems (unbiased estimate from n >= k samples per problem); kept = student / teacher"
        )
    return f"task score {metric} (higher is better); kept = student / teacher"


@dataclass
class ModelResult:
    """One model's entry in the report card.

    Attributes:
        name: shown in tables and plots (a path or a label).
        metrics: flat scores: ``ce`` / ``perplexity`` / ``kl`` / ``top1_agreement`` (from
            :meth:`HeldoutMetrics.student_metrics` or ``teacher_metrics``) and task scores such as
            ``humaneval/pass@1`` (from :func:`run_tasks`).
        parameter_bytes: size of the weights in bytes.
        tokens_per_s: generation speed in tokens per second.
        peak_memory_bytes: peak memory while generating, in bytes.
        price_per_hour: USD per hour of the device the speed was measured on.
        log_history: a Trainer's ``state.log_history``, for the training curves.
        run_tokens_per_s: tokens/s of each timed run (``tokens_per_s`` is their median), for the spread.
        row_sums: per held-out row, ``tokens`` and the sums of ``ce``, ``kl``, ``top1_agreement``
            (:meth:`HeldoutMetrics.student_row_sums`), for the paired comparison with a baseline.
        problem_scores: per task metric (``"humaneval/pass@1"``), the score of each problem
            (:func:`distill.evaluation.tasks.task_problem_scores`): the report gives such a metric a 95%
            interval over problems and compares it with a baseline by a paired bootstrap over problems.
    """

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    parameter_bytes: int | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    price_per_hour: float | None = None
    log_history: list[dict[str, Any]] | None = None
    run_tokens_per_s: list[float] | None = None
    row_sums: dict[str, Sequence[float]] | None = field(default=None, repr=False)
    problem_scores: dict[str, Sequence[float]] | None = field(default=None, repr=False)

    @classmethod
    def from_results(
        cls,
        name: str,
        metrics: Mapping[str, float] | None = None,
        *,
        speed: SpeedResult | None = None,
        log_history: Sequence[Mapping[str, Any]] | None = None,
        row_sums: Mapping[str, Sequence[float]] | None = None,
        problem_scores: Mapping[str, Sequence[float]] | None = None,
    ) -> ModelResult:
        """An entry from metrics, a :class:`SpeedResult` (size, speed and its runs, model memory, price),
        per-row sums (:meth:`HeldoutMetrics.student_row_sums`) and per-problem task scores
        (:func:`~distill.evaluation.tasks.task_problem_scores`)."""
        return cls(
            name=name,
            metrics=dict(metrics or {}),
            parameter_bytes=speed.parameter_bytes if speed else None,
            tokens_per_s=speed.tokens_per_s if speed else None,
            peak_memory_bytes=speed.peak_memory_bytes if speed else None,
            price_per_hour=speed.price_per_hour if speed else None,
            log_history=[dict(entry) for entry in log_history] if log_history is not None else None,
            run_tokens_per_s=list(speed.run_tokens_per_s) if speed and speed.run_tokens_per_s else None,
            row_sums={key: list(values) for key, values in row_sums.items()} if row_sums is not None else None,
            problem_scores={key: list(values) for key, values in problem_scores.items()} if problem_scores else None,
        )

    def interval(self, metric: str) -> Interval | None:
        """``metric``'s mean over problems with its 95% bootstrap interval, when per-problem scores are kept."""
        scores = (self.problem_scores or {}).get(metric)
        return mean_interval(scores) if scores else None

    @property
    def cost_per_million_tokens(self) -> float | None:
        """USD per million generated tokens, when both a price and a speed are known."""
        if self.price_per_hour is None or not self.tokens_per_s:
            return None
        return cost_per_million_tokens(self.price_per_hour, self.tokens_per_s)


@dataclass(frozen=True)
class ReportCard:
    """What :func:`write_report` wrote.

    Attributes:
        headline: the one-sentence summary.
        data: the contents of ``report.json``.
        files: every file written (``report.md``, ``report.json``, the PNGs).
        plots_skipped: why plots were not drawn, or None.
    """

    headline: str
    data: dict[str, Any]
    files: list[Path]
    plots_skipped: str | None


def _primary_metric(teacher: ModelResult, student: ModelResult) -> str | None:
    shared = [m for m in student.metrics if m in teacher.metrics and m not in _AGAINST_TEACHER]
    # A metric the teacher scores 0 on gives no ratio (e.g. pass@1 of a small teacher on few problems).
    shared = [m for m in shared if quality(m, teacher.metrics[m]) > 0] or shared
    tasks = [m for m in shared if m not in _LOWER_IS_BETTER]
    for candidates in (
        [m for m in tasks if m.endswith("pass@1")],
        tasks,
        [m for m in shared if m in ("ce", "bits_per_byte")],
        shared,
    ):
        if candidates:
            return candidates[0]
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.1 else f"${value:.3g}"


def _speedup_range(teacher: ModelResult, student: ModelResult) -> tuple[float, float, int] | None:
    """Slowest student run / fastest teacher run, the reverse, and the fewest runs; None without 2+ runs each."""
    if not teacher.run_tokens_per_s or not student.run_tokens_per_s:
        return None
    runs = min(len(teacher.run_tokens_per_s), len(student.run_tokens_per_s))
    if runs < 2:
        return None
    low = min(student.run_tokens_per_s) / max(teacher.run_tokens_per_s)
    high = max(student.run_tokens_per_s) / min(teacher.run_tokens_per_s)
    return low, high, runs


def _speed_clause(speedup: float, band: tuple[float, float, int] | None) -> str:
    if band is None:
        return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    low, high, runs = band
    if low <= 1 <= high:
        return f"no clear speed difference (speed ratio {low:.2f}-{high:.2f} over {runs}+ timed runs each)"
    if speedup >= 1:
        return f"{speedup:.2f}x faster ({low:.2f}-{high:.2f}x over {runs}+ timed runs each)"
    return f"{1 / speedup:.2f}x slower ({1 / high:.2f}-{1 / low:.2f}x over {runs}+ timed runs each)"


def _headline(teacher: ModelResult, student: ModelResult, primary: str | None) -> tuple[str, dict[str, Any]]:
    """The sentence and its numbers: ``quality_kept``, ``size_ratio``, ``speedup`` (+ range) and both costs."""
    band = _speedup_range(teacher, student)
    numbers = {
        "quality_kept": kept(primary, student.metrics[primary], teacher.metrics[primary]) if primary else None,
        "size_ratio": _ratio(student.parameter_bytes, teacher.parameter_bytes),
        "speedup": _ratio(student.tokens_per_s, teacher.tokens_per_s),
        "speedup_range": [band[0], band[1]] if band else None,
        "student_cost_per_million_tokens": student.cost_per_million_tokens,
        "teacher_cost_per_million_tokens": teacher.cost_per_million_tokens,
    }
    quality_kept, size_ratio, speedup = numbers["quality_kept"], numbers["size_ratio"], numbers["speedup"]
    sentence = "The student"
    if quality_kept is not None:
        sentence += f" keeps {quality_kept:.1%} of the teacher's quality"
    elif primary is None:
        sentence += " (no quality metric shared with the teacher)"
    else:
        sentence += f" (quality not comparable: the teacher scores 0 on {primary})"
    clauses = []
    if size_ratio is not None:
        clauses.append(f"at {size_ratio:.1%} of its size")
    if speedup is not None:
        clauses.append(_speed_clause(speedup, band))
    student_cost, teacher_cost = numbers["student_cost_per_million_tokens"], numbers["teacher_cost_per_million_tokens"]
    if student_cost is not None and teacher_cost is not None:
        clauses.append(f"{_usd(student_cost)} per million tokens instead of {_usd(teacher_cost)}")
    if clauses:
        sentence += (" " if size_ratio is not None else ", ") + ", ".join(clauses)
    return sentence + ".", numbers


# Verdicts of the KD-vs-baseline comparison, beside "kd" and "baseline" (which is better, at the 95% level).
UNCLEAR = "no clear difference"
UNTESTED = "not tested"
_PER_ROW = ("ce", "kl", "perplexity", "top1_agreement")  # the metrics HeldoutMetrics keeps per-row sums of


def _comparison(student: ModelResult, baseline: ModelResult) -> dict[str, dict[str, Any]]:
    """Per metric both have: ``kd_minus_baseline``, its 95% paired-bootstrap interval, rows, tokens and a verdict.

    ``better`` is ``"kd"`` or ``"baseline"`` only when the interval excludes 0, :data:`UNCLEAR` when it holds
    0, and :data:`UNTESTED` for a metric without per-row scores on both sides (no interval, no claim).
    Held-out metrics resample rows (token-weighted); task scores with per-problem scores resample problems.
    """
    out: dict[str, dict[str, Any]] = {}
    for metric, value in student.metrics.items():
        if metric not in baseline.metrics:
            continue
        entry: dict[str, Any] = {"kd_minus_baseline": value - baseline.metrics[metric], "better": UNTESTED}
        difference = None
        if student.row_sums is not None and baseline.row_sums is not None and metric in _PER_ROW:
            difference = paired_difference(student.row_sums, baseline.row_sums, metric)
        elif metric in (student.problem_scores or {}) and metric in (baseline.problem_scores or {}):
            difference = paired_score_difference(
                student.problem_scores[metric],
                baseline.problem_scores[metric],
                metric,  # type: ignore[index]
            )
        if difference is not None:
            kd_ahead = (difference.low > 0) == higher_is_better(metric)  # when clear: low > 0 means KD is higher
            better = UNCLEAR if not difference.clear else "kd" if kd_ahead else "baseline"
            entry.update(
                interval_95=[difference.low, difference.high], num_rows=difference.num_rows,
                num_tokens=difference.num_tokens, unit=difference.unit, better=better,
            )  # fmt: skip
        out[metric] = entry
    return out


def _evidence(entry: Mapping[str, Any]) -> str:
    if "interval_95" not in entry:
        return f"{entry['kd_minus_baseline']:+.4g}, no per-row scores: {UNTESTED}"
    low, high = entry["interval_95"]
    sample = (
        f"{entry['num_rows']} problems"
        if entry.get("unit") == "problems"
        else f"{entry['num_rows']} rows / {entry['num_tokens']} tokens"
    )
    return f"{entry['kd_minus_baseline']:+.4g}, 95% CI [{low:+.4g}, {high:+.4g}], {sample}"


def _comparison_line(comparison: dict[str, dict[str, Any]]) -> str:
    groups = (("kd", "better on"), ("baseline", "worse on"), (UNCLEAR, UNCLEAR + " on"), (UNTESTED, "not tested on"))
    parts = []
    for verdict, label in groups:
        listed = [f"`{m}` ({_evidence(entry)})" for m, entry in comparison.items() if entry["better"] == verdict]
        if listed:
            parts.append(f"{label} " + ", ".join(listed))
    return (
        "Against the baseline student (KD − baseline, paired bootstrap over the same held-out rows or task problems): "
        + "; ".join(parts)
        + "."
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    small_or_large = value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3)
    return f"{value:.{digits}g}" if small_or_large else f"{value:.{digits}f}"


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    return f"{num_bytes / 1e9:,.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:,.1f} MB"


def _metrics_table(models: dict[str, ModelResult], teacher: ModelResult, comparison: dict[str, Any] | None) -> str:
    roles = list(models)
    metrics = list(dict.fromkeys(metric for model in models.values() for metric in model.metrics))
    header = ["metric", "unit", *roles] + [f"{role} kept" for role in roles if role != "teacher"]
    if comparison is not None:
        header.append("KD − baseline [95% CI] (verdict)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for metric in metrics:
        cells = [f"`{metric}`", _UNITS.get(metric, "fraction" if "pass@" in metric else "")]
        cells += [_value_cell(model, metric) for model in models.values()]
        for role in roles[1:]:
            value, reference = models[role].metrics.get(metric), teacher.metrics.get(metric)
            ratio = kept(metric, value, reference) if value is not None and reference is not None else None
            cells.append(f"{ratio:.1%}" if ratio is not None else "–")
        if comparison is not None:
            entry = comparison.get(metric)
            if entry is None:
                cells.append("–")
            else:
                verdict = entry["better"] if entry["better"] in (UNCLEAR, UNTESTED) else f"{entry['better']} better"
                interval = entry.get("interval_95")
                ci = f" [{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else ""
                cells.append(f"{entry['kd_minus_baseline']:+.4f}{ci} ({verdict})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _value_cell(model: ModelResult, metric: str) -> str:
    """The metric's value, with its 95% interval over problems and their count when per-problem scores are kept."""
    interval = model.interval(metric)
    if interval is None or interval.count < 2:
        return _fmt(model.metrics.get(metric))
    return f"{_fmt(model.metrics.get(metric))} [{interval.low:.2f}, {interval.high:.2f}] (n={interval.count})"


def _intervals(model: ModelResult) -> dict[str, dict[str, float | int]]:
    """Per task metric with per-problem scores: its 95% interval over problems and the problem count (for JSON)."""
    out = {}
    for metric in model.problem_scores or {}:
        interval = model.interval(metric)
        if interval is not None:
            out[metric] = {"low": interval.low, "high": interval.high, "num_problems": interval.count}
    return out


def _tokens_per_s(model: ModelResult) -> str:
    if model.tokens_per_s is None:
        return "–"
    if not model.run_tokens_per_s:
        return f"{model.tokens_per_s:,.1f}"
    return spread(model.run_tokens_per_s).text()


def _cost_table(models: dict[str, ModelResult]) -> str:
    lines = [
        "| role | model | parameters | tokens/s: median (min-max, runs) | model memory (weights + activations) "
        "| $/hour | $ per million tokens |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for role, model in models.items():
        cost = model.cost_per_million_tokens
        cells = [
            role,
            f"`{model.name}`",
            _size(model.parameter_bytes),
            _tokens_per_s(model),
            _size(model.peak_memory_bytes),
            _usd(model.price_per_hour) if model.price_per_hour is not None else "–",
            _usd(cost) if cost is not None else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(out: Path, models: dict[str, ModelResult], primary: str | None) -> tuple[list[Path], str | None]:
    reason = plots_unavailable()
    if reason is not None:
        return [], reason
    written = []
    histories = {role: m.log_history for role, m in models.items() if m.log_history}
    if histories and plot_training_curves(out / "training_curves.png", histories):
        written.append(out / "training_curves.png")
    if primary is not None:
        points = [
            (
                role,
                quality(primary, m.metrics[primary]) if primary in m.metrics else None,
                m.parameter_bytes / _MB if m.parameter_bytes else None,
                m.tokens_per_s,
            )
            for role, m in models.items()
        ]
        label = {
            "ce": "quality: exp(-CE)",
            "perplexity": "quality: 1 / perplexity",
            "bits_per_byte": "quality: 2^-bits/byte",
        }.get(primary, primary)
        if plot_quality_vs_cost(out / "quality_vs_cost.png", points, label):
            written.append(out / "quality_vs_cost.png")
    return written, None


def _budget_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def summary_tables(teacher: ModelResult, student: ModelResult, baseline: ModelResult | None = None) -> str:
    """The report's two markdown tables: cost (size, tokens/s with spread, model memory, $ per million tokens) and
    quality.

    The quality table has every metric of every model, the fraction of the teacher's quality each student
    keeps (see :func:`kept`), and, with a baseline, ``KD - baseline`` per metric with its 95% interval.
    """
    models = {"teacher": teacher, "student": student, **({"baseline": baseline} if baseline else {})}
    comparison = _comparison(student, baseline) if baseline else None
    return _cost_table(models) + "\n\n" + _metrics_table(models, teacher, comparison)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_report(
    out_dir: str | Path,
    teacher: ModelResult,
    student: ModelResult,
    baseline: ModelResult | None = None,
    *,
    primary_metric: str | None = None,
    title: str = "Distillation report card",
    sandbox: dict[str, Any] | None = None,
    budget: Mapping[str, Any] | None = None,
) -> ReportCard:
    """Write ``report.md``, ``report.json`` and PNG plots comparing a KD student with its teacher.

    The headline reads "The student keeps X% of the teacher's quality at Y% of its size, Zx faster,
    $W per million tokens instead of $V", with X from ``primary_metric`` (see :func:`kept`), Y the
    ratio of parameter bytes, Z the ratio of generation tokens/s, W and V each model's
    ``price_per_hour / (tokens_per_s * 3600) * 1e6``; clauses whose inputs are missing are left out.
    With a ``baseline`` (a student of the same size trained without KD), every shared metric gets
    ``KD - baseline`` and which is better.

    Args:
        out_dir: created if needed.
        teacher: the teacher's entry.
        student: the KD student's entry.
        baseline: optionally, a baseline student's entry.
        primary_metric: the metric the headline's quality uses; default the first shared
            ``.../pass@1``, else another task score, else ``ce``.
        title: the markdown title.
        sandbox: how model-written code ran for the task scores, ``{"isolation": ..., "layers": [...]}``
            (:attr:`HumanEvalPassAtK.sandbox_record`); recorded in both files.
        budget: what training the student cost (e.g. ``{"optimizer steps": 40, "training tokens": 20480,
            "training seconds": 95}``), printed under the headline and saved in ``report.json``.

    Returns:
        The :class:`ReportCard`. Without matplotlib the plots are skipped and the report says so.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {"teacher": teacher, "student": student, **({"baseline": baseline} if baseline else {})}
    primary = primary_metric or _primary_metric(teacher, student)
    if primary is not None and (primary not in teacher.metrics or primary not in student.metrics):
        raise ValueError(f"primary_metric {primary!r} is not in both the teacher's and the student's metrics.")
    if primary in _AGAINST_TEACHER:
        raise ValueError(f"primary_metric {primary!r} is measured against the teacher, so it has no 'kept' ratio.")
    headline, numbers = _headline(teacher, student, primary)
    comparison = _comparison(student, baseline) if baseline else None
    plots, skipped = _plots(out, models, primary)

    metrics = list(dict.fromkeys(metric for model in models.values() for metric in model.metrics))
    data = {
        "headline": headline,
        "primary_metric": primary,
        "quality_definition": _definition(primary) if primary else None,
        **numbers,
        "models": {
            role: {
                "name": m.name,
                "metrics": m.metrics,
                "parameter_bytes": m.parameter_bytes,
                "tokens_per_s": m.tokens_per_s,
                "run_tokens_per_s": m.run_tokens_per_s,
                "peak_memory_bytes": m.peak_memory_bytes,
                "price_per_hour": m.price_per_hour,
                "cost_per_million_tokens": m.cost_per_million_tokens,
                "kept": {k: kept(k, m.metrics[k], teacher.metrics[k]) for k in m.metrics if k in teacher.metrics},
                "intervals_95": _intervals(m),
            }
            for role, m in models.items()
        },
        "kd_vs_baseline": comparison,
        "metric_definitions": {metric: _definition(metric) for metric in metrics},
        "plots": [path.name for path in plots],
        "plots_skipped": skipped,
        "sandbox": sandbox,
        "budget": dict(budget) if budget else None,
    }
    (out / "report.json").write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    sections = [f"# {title}", f"**{headline}**"]
    if budget:
        sections.append(
            "Training budget: " + "; ".join(f"{key}: {_budget_value(v)}" for key, v in budget.items()) + "."
        )
    if primary:
        sections.append(f"Quality in this sentence is `{primary}`: {_definition(primary)}.")
    if comparison:
        sections.append(_comparison_line(comparison))
    sections += ["## Cost", _cost_table(models), "## Quality", _metrics_table(models, teacher, comparison)]
    sections.append("### What the metrics mean\n\n" + "\n".join(f"- `{m}`: {_definition(m)}." for m in metrics))
    if sandbox:
        layers = ", ".join(sandbox.get("layers", ())) or "none"
        isolation = sandbox["isolation"]
        sections.append(f"Model-written code ran in `distill.sandbox` with **{isolation}** isolation ({layers}).")
    sections.append("## Plots")
    if skipped:
        sections.append(f"Plots skipped: {skipped}.")
    else:
        sections.append("\n\n".join(f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots) or "Nothing to plot.")
    (out / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return ReportCard(
        headline=headline, data=data, files=[out / "report.md", out / "report.json", *plots], plots_skipped=skipped
    )

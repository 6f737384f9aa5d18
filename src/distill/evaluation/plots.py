"""PNG plots for the report card, drawn with matplotlib's Agg canvas (imported lazily, no pyplot state).

matplotlib is optional (``pip install 'distill[report]'``); :func:`plots_unavailable` says why the
plots cannot be drawn, and the report then writes only its markdown and JSON.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TRAINING_SERIES",
    "plot_quality_vs_cost",
    "plot_quality_vs_time",
    "plot_training_curves",
    "plots_unavailable",
]

# Trainer log keys drawn against the optimizer step: total loss, its KD term, its cross-entropy term.
TRAINING_SERIES = ("loss", "kd_loss", "ce_loss")
_SERIES_MEANING = {"loss": "(the objective trained)", "kd_loss": "(to the teacher)", "ce_loss": "(to the data)"}


def plots_unavailable() -> str | None:
    """None when matplotlib can be imported, else why not (with the install command)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib is not installed ({error}); install it with: pip install 'distill[report]'"
    return None


def _figure(width: float, height: float, panels: int) -> tuple[Any, list[Any]]:
    # A bare Figure with an Agg canvas: no pyplot, so the caller's backend and open figures are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_training_curves(path: str | Path, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> bool:
    """Draw each model's logged ``loss``, ``kd_loss`` and ``ce_loss`` against the optimizer step, one panel per model.

    Models never share an axis: a KD student's ``loss`` is a divergence to its teacher and a baseline's is a
    cross-entropy to the data, and the two numbers mean different things. Each panel's y axis starts at 0
    (every series is a non-negative loss).

    Args:
        path: the PNG to write.
        histories: per model name (a short role such as ``"student"``; it titles the panel), a Trainer's
            ``state.log_history`` (dicts with ``step`` and the logged values; evaluation lines are ignored).

    Returns:
        False (and nothing written) when no history holds any of the series.
    """
    panels = {
        name: {
            key: [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            for key in TRAINING_SERIES
        }
        for name, history in histories.items()
    }
    panels = {name: {key: pts for key, pts in lines.items() if pts} for name, lines in panels.items()}
    panels = {name: lines for name, lines in panels.items() if lines}
    if not panels:
        return False
    figure, axes = _figure(4.2 * len(panels), 3.4, len(panels))
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for keys, points in _merge_identical(lines):
            steps, values = zip(*points, strict=True)
            label = f"{' = '.join(keys)} {_SERIES_MEANING[keys[-1]]}"  # e.g. "loss = ce_loss (to the data)"
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=label)
        ax.set_title(textwrap.fill(name, 40), fontsize="medium")  # wraps instead of running into the next panel
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats/token)")
        top = max(value for points in lines.values() for _, value in points)
        ax.set_ylim(0, top * 1.08 if top > 0 else 1)  # room above a flat curve for the legend
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return True


def _merge_identical(lines: Mapping[str, list[tuple[Any, Any]]]) -> list[tuple[list[str], list[tuple[Any, Any]]]]:
    """Series with the same points drawn once, named by all their keys (a run trained on cross-entropy alone
    logs ``loss == ce_loss``: two labels on one line would hide one of them)."""
    merged: list[tuple[list[str], list[tuple[Any, Any]]]] = []
    for key, points in lines.items():
        for keys, seen in merged:
            if seen == points:
                keys.append(key)
                break
        else:
            merged.append(([key], points))
    return merged


# Markers cycled over models, so the legend tells points apart without text on the plot (which overlaps).
_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_quality_vs_cost(
    path: str | Path,
    points: Sequence[tuple[str, float | None, float | None, float | None]],
    quality_label: str,
) -> bool:
    """Two scatters of quality: against size (MB, log scale) and against generation speed (tokens/s).

    Each model has its own colour and marker, named once in a legend below the panels (no text beside the
    points, which overlaps when two models are close). The quality axis starts at 0: quality is never negative.

    Args:
        path: the PNG to write.
        points: per model ``(name, quality, size_mb, tokens_per_s)``; None values are left out of a panel.
        quality_label: the y-axis label (the metric and how it is turned into quality).

    Returns:
        False (and nothing written) when no model has both a quality and a size or a speed.
    """

    from matplotlib.ticker import FormatStrFormatter, LogLocator

    def usable(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    panels = [
        (index, title)
        for index, title in ((2, "size (MB of parameters)"), (3, "generation speed (tokens/s, median)"))
        if any(usable(point[1]) and usable(point[index]) for point in points)
    ]
    if not panels:
        return False
    figure, axes = _figure(4.6 * len(panels), 3.9, len(panels))
    handles = {}
    for ax, (index, title) in zip(axes, panels, strict=True):
        for number, point in enumerate(points):
            if usable(point[1]) and usable(point[index]):
                handles[point[0]] = ax.scatter(
                    [point[index]], [point[1]], s=60, marker=_MARKERS[number % len(_MARKERS)], color=f"C{number}"
                )
        ax.set_xscale("log")
        # Plain numbers (200, 500, 1000) instead of 2x10^2 on the log axis.
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize="small")
        ax.set_xlabel(title)
        ax.set_ylabel(quality_label)
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.25, y=0.15)
        ax.set_ylim(bottom=0)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 3))
    figure.savefig(path, dpi=120)
    return True


def plot_quality_vs_time(
    path: str | Path, curves: Mapping[str, Sequence[tuple[float, float]]], *, teacher_ce: float | None = None
) -> bool:
    """Held-out cross-entropy (nats/token) against training seconds, one line per run.

    Args:
        path: the PNG to write.
        curves: per run name, ``(training seconds, held-out CE)`` points in order.
        teacher_ce: drawn as a dashed line (the floor a student approaches), when given.

    Returns:
        False (and nothing written) when no curve has a point.
    """
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return False
    figure, (ax,) = _figure(6.4, 4.0, 1)
    for name, points in curves.items():
        seconds, values = zip(*points, strict=True)
        ax.plot(seconds, values, marker="o", markersize=3, label=name)
    if teacher_ce is not None:
        ax.axhline(teacher_ce, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return True

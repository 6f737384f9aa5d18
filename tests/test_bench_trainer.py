"""Smoke test of ``benchmarks/bench_trainer.py`` at its tiny preset: every case it runs gives a full table row."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_trainer.py"


@pytest.mark.slow
def test_bench_trainer_tiny_preset(tmp_path: Path) -> None:
    # One subprocess per case, ~6 s each (mostly imports), so two cases: ours and the GKD baseline it is
    # compared with, or without trl, ours off- and on-policy.
    has_trl = importlib.util.find_spec("trl") is not None
    cases = ["distill", "gkd"] if has_trl else ["distill", "distill-onpolicy"]
    out = tmp_path / "table.md"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "2", "--threads", "1"]
    proc = subprocess.run(
        [*command, "--cases", ",".join(cases), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report.strip() == proc.stdout.strip()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == len(cases), report
    for row in rows:
        label, policy, steps, tokens_per_s, versus, step_s, memory, versus_memory, loss = (
            cell.strip() for cell in row.strip("|").split("|")
        )
        assert steps == "1", row  # 2 steps, the first one is the warm-up
        assert float(tokens_per_s.replace(",", "")) > 0, row
        assert float(memory.split()[0]) >= 0, row
        assert math.isfinite(float(loss.split()[0])), row
        if "gkd" in cases and policy.startswith("off"):  # the ratio against GKDTrainer is filled in
            assert versus.endswith("x") and versus_memory.endswith("x"), row

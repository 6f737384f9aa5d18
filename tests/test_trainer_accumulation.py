"""Token-weighted accumulation (distill.trainer.accumulation): a step's gradient is one big batch's, however split.

The rows' completions hold 1 to 8 sentences, so micro-batches carry very different numbers of loss tokens:
averaging micro-batch means (the engine's default) would give another gradient.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accumulation_helpers import ROWS, max_relative_difference, step_gradients

from distill.trainer.accumulation import StepTokens

SCRIPT = Path(__file__).parent / "scripts" / "step_gradients.py"
# fp32 gradients of the same sums taken in another order / with other padding: rounding only.
TOLERANCE = 1e-5

SETTINGS = {
    "off_policy": {},
    "on_policy": {"lmbda": 1.0},  # every micro-batch replaced by the student's (greedy) completions
    "hidden_loss": {"hidden_loss_weight": 1.0, "hidden_loss_tokens": "all"},  # a second, other token count
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_accumulation_equals_one_big_batch(tmp_path, tokenizer, name) -> None:
    overrides = SETTINGS[name]
    one_batch = step_gradients(tmp_path / "one", tokenizer, batch=ROWS, accumulation=1, **overrides)
    accumulated = step_gradients(tmp_path / "four", tokenizer, batch=ROWS // 4, accumulation=4, **overrides)
    difference = max_relative_difference(accumulated["gradients"], one_batch["gradients"])
    assert difference < TOLERANCE, difference
    # The same tokens were trained (generated ones for on-policy) and logged as the same token-weighted loss.
    first, second = (result["trainer"].state.log_history[0] for result in (one_batch, accumulated))
    assert first["loss_tokens"] == second["loss_tokens"] > 0
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-5)
    if name == "on_policy":
        assert first["on_policy_fraction"] == second["on_policy_fraction"] == 1.0


def test_step_tokens_scale() -> None:
    step = StepTokens(loss_tokens=100, hidden_tokens=40, processes=2)
    assert step.scale(25) == pytest.approx(0.5)  # 25 of 100 tokens, gradients averaged over 2 processes
    assert step.scale(10, hidden=True) == pytest.approx(0.5)
    assert StepTokens(0, 0, 1).scale(0) == 0.0  # a step without loss tokens contributes nothing


@pytest.mark.slow
def test_two_processes_with_accumulation_equal_one_big_batch(tmp_path, tokenizer) -> None:
    """2 gloo processes x accumulation 2 x 2 rows == 1 process x 1 micro-batch of the same 8 rows."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    launcher = Path(sys.executable).parent / "accelerate"
    port = str(20000 + (os.getpid() * 11 + 7) % 20000)
    # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    command += [str(SCRIPT), "--out", str(tmp_path), "--batch", "2", "--accumulation", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("off_policy", "on_policy"):
        reference = step_gradients(tmp_path / f"reference-{name}", tokenizer, batch=ROWS, accumulation=1,
                                   **SETTINGS[name])  # fmt: skip
        distributed = torch.load(tmp_path / f"{name}.pt")
        difference = max_relative_difference(distributed, reference["gradients"])
        assert difference < TOLERANCE, (name, difference)

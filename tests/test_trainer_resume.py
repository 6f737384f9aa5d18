"""A run that is stopped (asked to stop, SIGTERM, or SIGKILL) and resumed ends where an uninterrupted one does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import arithmetic_dataset, config, state_vector
from transformers import TrainerCallback

from distill import Trainer
from distill.testing import tiny_teacher_student

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
TOL = 1e-6


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(tmp_path: Path, tokenizer, resume: bool = False, stop_at: int | None = None, **overrides):
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path, max_steps=8, **overrides),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
        callbacks=[_StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return state_vector(trainer.model)


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_resume_matches_uninterrupted(tmp_path, tokenizer, lmbda) -> None:
    """Half the steps on-policy (sampling), so data order, coin flips and sampling RNG must all resume."""
    reference = _train(tmp_path / "full", tokenizer, lmbda=lmbda)
    interrupted = tmp_path / "interrupted"
    _train(interrupted, tokenizer, stop_at=4, lmbda=lmbda, save_strategy="steps", save_steps=4)
    assert (interrupted / "checkpoint-4").is_dir()
    resumed = _train(interrupted, tokenizer, resume=True, lmbda=lmbda, save_strategy="steps", save_steps=4)
    assert torch.allclose(resumed, reference, atol=TOL, rtol=0), (resumed - reference).abs().max()


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *extra], env=env)


def _wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    progress = out / "progress.txt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if progress.exists() and int(progress.read_text() or 0) >= step:
            return
        assert process.poll() is None, f"training exited early with {process.returncode}"
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches(tmp_path) -> None:
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _launch(reference_dir, "--lmbda", "0.5").wait(timeout=300) == 0
    process = _launch(run_dir, "--lmbda", "0.5", "--step-sleep", "0.3")
    _wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, "SIGTERM should end the run with exit code 143 after a checkpoint"
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert checkpoints, "SIGTERM did not save a checkpoint"
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 3 <= stopped_at < 8
    assert _launch(run_dir, "--lmbda", "0.5", "--resume").wait(timeout=300) == 0
    resumed, reference = torch.load(run_dir / "final.pt"), torch.load(reference_dir / "final.pt")
    assert torch.allclose(resumed, reference, atol=TOL, rtol=0)


@pytest.mark.slow
def test_sigkill_resumes_from_last_periodic_checkpoint(tmp_path) -> None:
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _launch(reference_dir).wait(timeout=300) == 0
    process = _launch(run_dir, "--save-steps", "2", "--step-sleep", "0.3")
    _wait_for_step(run_dir, 5, process)
    process.kill()
    process.wait(timeout=60)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*"))[-1] in ("checkpoint-4", "checkpoint-6")
    assert _launch(run_dir, "--save-steps", "2", "--resume").wait(timeout=300) == 0
    resumed, reference = torch.load(run_dir / "final.pt"), torch.load(reference_dir / "final.pt")
    assert torch.allclose(resumed, reference, atol=TOL, rtol=0)


@pytest.mark.slow
def test_two_process_accelerate_launch_ranks_agree(tmp_path) -> None:
    """Real ``accelerate launch`` with 2 processes (gloo on a CPU): DDP keeps both ranks' weights identical."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    launcher = Path(sys.executable).parent / "accelerate"
    # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]
    command += [str(SCRIPT), "--out", str(tmp_path), "--max-steps", "4", "--lmbda", "0.5"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "final-rank0.pt"), torch.load(tmp_path / "final-rank1.pt")
    assert torch.equal(rank0, rank1)
    # Both ranks trained on their own shard: 4 steps x 2 ranks x 4 rows = one epoch of the 32 rows.
    assert "'epoch': '1'" in result.stdout

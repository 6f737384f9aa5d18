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


def _accelerate_launch(out: Path, *script_args: str) -> subprocess.CompletedProcess:
    """Real ``accelerate launch`` of the training script with 2 processes (gloo on a CPU)."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    launcher = Path(sys.executable).parent / "accelerate"
    port = str(20000 + (os.getpid() * 7 + len(script_args) * 13 + hash(str(out))) % 20000)
    # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    command += [str(SCRIPT), "--out", str(out), "--max-steps", "4", *script_args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_agree_and_a_sharded_teacher_changes_nothing(tmp_path) -> None:
    """DDP keeps both ranks identical; sharding the teacher (FSDP2) gives the same training as replicating it."""
    replicated = _accelerate_launch(tmp_path / "replicated", "--lmbda", "0.5", "--teacher-sharding", "none")
    _accelerate_launch(tmp_path / "sharded", "--lmbda", "0.5", "--teacher-sharding", "fsdp")
    weights = {
        (run, rank): torch.load(tmp_path / run / f"final-rank{rank}.pt")
        for run in ("replicated", "sharded")
        for rank in (0, 1)
    }
    assert torch.equal(weights["replicated", 0], weights["replicated", 1])
    assert torch.equal(weights["sharded", 0], weights["sharded", 1])
    assert torch.allclose(weights["sharded", 0], weights["replicated", 0], atol=TOL, rtol=0)
    # Both ranks trained on their own shard of the data: 4 steps x 2 ranks x 4 rows = one epoch of 32 rows.
    assert "'epoch': '1'" in replicated.stdout
    kind, local = (tmp_path / "sharded" / "teacher-rank0.txt").read_text().split()
    full_kind, full = (tmp_path / "replicated" / "teacher-rank0.txt").read_text().split()
    assert kind == "DTensor" and full_kind != "DTensor" and int(local) * 2 == int(full)


@pytest.mark.slow
def test_sequence_level_kd_with_a_sharded_teacher(tmp_path) -> None:
    """The sharded teacher generates in lockstep on both ranks (synced_gpus), and training goes on."""
    result = _accelerate_launch(tmp_path, "--seq-kd", "--teacher-sharding", "fsdp")
    assert "'on_policy_fraction': '1'" in result.stdout
    assert torch.equal(torch.load(tmp_path / "final-rank0.pt"), torch.load(tmp_path / "final-rank1.pt"))

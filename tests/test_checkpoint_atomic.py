"""A checkpoint save killed half-way never blocks a resume; a resume under changed settings is not silent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import arithmetic_dataset, config

from distill import Trainer
from distill.checks import InputError
from distill.models.files import IncompleteFilesError
from distill.testing import tiny_teacher_student
from distill.trainer.checkpoints import MARKER_NAME, checkpoint_problem

SCRIPT = Path(__file__).parent / "scripts" / "kill_mid_save.py"


def _trainer(out: Path, tokenizer, **overrides) -> Trainer:
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    settings = {**dict(max_steps=4, save_strategy="steps", save_steps=2), **overrides}
    return Trainer(
        model=student,
        teacher=teacher,
        args=config(out, **settings),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )


def test_sigkill_during_a_save_then_resume_skips_the_partial_checkpoint(tmp_path: Path, tokenizer) -> None:
    out = tmp_path / "run"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--kill-at", "3"], env=env, capture_output=True, timeout=300
    )
    assert finished.returncode == -signal.SIGKILL, finished.stderr.decode()[-2000:]
    partial = out / "checkpoint-3"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()  # killed mid-save, really

    trainer = _trainer(out, tokenizer, max_steps=5, save_steps=1)
    with pytest.warns(UserWarning, match="checkpoint-3"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 5
    assert (out / "checkpoint-2" / MARKER_NAME).is_file() and checkpoint_problem(out / "checkpoint-2") is None
    # The step-3 checkpoint was written again, whole, over the partial one.
    assert checkpoint_problem(out / "checkpoint-3") is None and (out / "checkpoint-3" / MARKER_NAME).is_file()


def test_only_incomplete_checkpoints_are_named_when_none_is_usable(tmp_path: Path, tokenizer) -> None:
    out = tmp_path / "run"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    trainer = _trainer(out, tokenizer)
    with pytest.raises(ValueError, match=r"No valid checkpoint.*checkpoint-7"):
        trainer.train(resume_from_checkpoint=True)


def test_a_truncated_checkpoint_file_is_named(tmp_path: Path, tokenizer) -> None:
    out = tmp_path / "run"
    _trainer(out, tokenizer, max_steps=2).train()
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(IncompleteFilesError, match=r"checkpoint-2 is incomplete.*model\.safetensors"):
        _trainer(out, tokenizer).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    # And a truncated optimizer state (a torch zip) with the marker gone: named by its structure alone.
    (out / "checkpoint-2" / MARKER_NAME).unlink()
    weights.unlink()
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert "optimizer.pt" in checkpoint_problem(out / "checkpoint-2")


@pytest.mark.parametrize(
    ("field", "value"), [("learning_rate", 1e-3), ("loss", "forward_kl"), ("beta", 0.9), ("temperature", 2.0)]
)
def test_resuming_with_other_settings_is_refused_or_reported(tmp_path: Path, tokenizer, field, value) -> None:
    out = tmp_path / "run"
    _trainer(out, tokenizer, max_steps=2).train()
    saved = json.loads((out / "checkpoint-2" / MARKER_NAME).read_text())["settings"]
    assert saved[field] != value
    with pytest.raises(InputError, match=rf"{field}: .* -> .*allow_resume_changes"):
        _trainer(out, tokenizer, **{field: value}).train(resume_from_checkpoint=True)
    allowed = _trainer(out, tokenizer, allow_resume_changes=True, **{field: value})
    allowed.train(resume_from_checkpoint=True)
    assert allowed.state.global_step == 4

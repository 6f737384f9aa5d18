"""The model card saved with the student (``README.md``): it names the teacher, the loss, the data and the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import arithmetic_dataset, config

from distill import Trainer
from distill.testing import tiny_teacher_student
from distill.trainer.model_card import CARD_MARKER, read_budget, training_seconds


@pytest.fixture
def teacher_folder(tmp_path: Path, tokenizer) -> Path:
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher.save_pretrained(tmp_path / "my-teacher")
    tokenizer.save_pretrained(tmp_path / "my-teacher")
    return tmp_path / "my-teacher"


def test_saved_student_has_a_card_naming_teacher_loss_data_and_budget(tmp_path, tokenizer, teacher_folder):
    _, student = tiny_teacher_student(vocab_size=len(tokenizer))
    args = config(tmp_path / "out", loss="jsd", beta=0.25, temperature=2.0, ce_weight=0.5, max_steps=3)
    trainer = Trainer(model=student, teacher=str(teacher_folder), args=args, train_dataset=arithmetic_dataset(12),
                      processing_class=tokenizer)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))

    card = (tmp_path / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and CARD_MARKER in card
    assert f"| teacher | `{teacher_folder}` |" in card
    assert "| loss | 1.0 x KD (`jsd`, beta=0.25, temperature=2.0) + 0.5 x cross-entropy on the data" in card
    assert "on completion tokens, off-policy" in card
    assert "| data | 12 rows (messages)" in card and "carry loss" in card
    assert "- optimizer steps: 3\n- rows per step: 4\n- rows seen: 12\n" in card
    assert "- training seconds: " in card and "- devices: 1 x cpu" in card
    assert "AutoModelForCausalLM.from_pretrained(" in card  # how to load it
    budget = read_budget(tmp_path / "student")
    assert budget["optimizer steps"] == 3 and budget["rows seen"] == 12 and budget["training seconds"] > 0


def test_a_readme_of_your_own_is_kept_and_a_model_object_teacher_is_described(tmp_path, tokenizer):
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    trainer = Trainer(model=student, teacher=teacher, args=config(tmp_path / "out", max_steps=1),
                      train_dataset=arithmetic_dataset(4), processing_class=tokenizer)  # fmt: skip
    trainer.save_model(str(folder))
    assert (folder / "README.md").read_text() == "# my notes\n" and read_budget(folder) is None

    trainer.save_model(str(tmp_path / "other"))  # before any training: the budget says 0 steps
    card = (tmp_path / "other" / "README.md").read_text()
    parameters = sum(p.numel() for p in teacher.parameters())
    assert f"| teacher | a LlamaForCausalLM built in memory ({parameters:,} parameters) |" in card
    assert "| loss | 1.0 x KD (`jsd`, beta=0.5, temperature=1.0), on completion tokens" in card
    assert json.loads(json.dumps(read_budget(tmp_path / "other")))["optimizer steps"] == 0


def test_short_runs_keep_their_training_seconds():
    # A 3-step tiny run can take 0.04 s: one decimal wrote "training seconds: 0.0", as if nothing had trained.
    assert training_seconds(0.0412) == 0.041 and training_seconds(0.96) == 0.96
    assert training_seconds(95.123) == 95.1 and training_seconds(3600.04) == 3600.0

"""Bad input fails before training starts, with a message that says what to change, and writes nothing."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trainer_helpers import arithmetic_dataset, arithmetic_rows, config

from distill import NonFiniteLossError, Trainer
from distill.data import DataError
from distill.losses import TeacherHead, VocabularyMismatchError
from distill.teachers import ModelTeacher
from distill.testing import tiny_llama, train_tiny_tokenizer


def _fails(tmp_path, tokenizer, pair, error, match, dataset=None, **kwargs) -> None:
    teacher, student = pair
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        trainer = Trainer(
            model=student,
            teacher=teacher,
            args=config(out, **kwargs.pop("args", {})),
            train_dataset=dataset if dataset is not None else arithmetic_dataset(),
            processing_class=tokenizer,
            **kwargs,
        )
        trainer.train()
    assert not out.exists(), "a rejected run wrote files"


def test_unknown_columns(tmp_path, tokenizer, tiny_pair) -> None:
    data = Dataset.from_list([{"question": "q", "answer": "a"}])
    _fails(tmp_path, tokenizer, tiny_pair, DataError, "question", dataset=data)


def test_empty_completion(tmp_path, tokenizer, tiny_pair) -> None:
    rows = arithmetic_rows(4, layout="prompt_completion")
    rows[2]["completion"] = "  "
    _fails(tmp_path, tokenizer, tiny_pair, DataError, "2", dataset=Dataset.from_list(rows))


def test_every_token_masked(tmp_path, tokenizer, tiny_pair) -> None:
    rows = arithmetic_rows(4)
    rows[1]["messages"] = rows[1]["messages"][:1] + [{"role": "assistant", "content": ""}]
    _fails(tmp_path, tokenizer, tiny_pair, DataError, "1", dataset=Dataset.from_list(rows))


def test_prompt_longer_than_max_length(tmp_path, tokenizer, tiny_pair) -> None:
    rows = arithmetic_rows(4, layout="prompt_completion")
    rows[3]["prompt"] = "What is the sum of all these numbers? " * 20
    _fails(tmp_path, tokenizer, tiny_pair, DataError, "max_length", dataset=Dataset.from_list(rows))


def test_tokenizers_differ(tmp_path, tokenizer, tiny_pair) -> None:
    other = train_tiny_tokenizer(texts=["completely different corpus " * 50, "with other merges 0123456789"] * 20)
    _fails(tmp_path, tokenizer, tiny_pair, VocabularyMismatchError, "differ", teacher_processing_class=other)


def test_vocab_sizes_the_padding_rule_cannot_explain(tmp_path, tokenizer) -> None:
    # The teacher's head is smaller than the tokenizer: this tokenizer is not the teacher's.
    teacher = tiny_llama(vocab_size=len(tokenizer) - 100, seed=3)
    student = tiny_llama(vocab_size=len(tokenizer), seed=4)
    _fails(tmp_path, tokenizer, (teacher, student), VocabularyMismatchError, "teacher")


def test_padded_heads_are_accepted(tmp_path, tokenizer) -> None:
    """Heads padded past the tokenizer (e.g. to a multiple of 64) differ in size but share the tokenizer."""
    teacher = tiny_llama(vocab_size=len(tokenizer) + 64, seed=3)
    student = tiny_llama(vocab_size=len(tokenizer) + 8, seed=4)
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path, max_steps=1),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.vocab_size == len(tokenizer)
    trainer.train()


def test_teacher_is_the_student(tmp_path, tokenizer, tiny_pair) -> None:
    _, student = tiny_pair
    _fails(tmp_path, tokenizer, (student, student), ValueError, "itself")


def test_quantized_student_without_lora(tmp_path, tokenizer, tiny_pair) -> None:
    pytest.importorskip("bitsandbytes")
    from distill.models import load_causal_lm

    teacher, student = tiny_pair
    student.save_pretrained(tmp_path / "student")
    student_4bit = load_causal_lm(tmp_path / "student", quantization="4bit", dtype="float32")
    _fails(tmp_path, tokenizer, (teacher, student_4bit), ValueError, "LoRA")


def test_plain_training_arguments_are_refused(tmp_path, tokenizer, tiny_pair) -> None:
    from transformers import TrainingArguments

    teacher, student = tiny_pair
    with pytest.raises(TypeError, match="DistillConfig"):
        Trainer(model=student, teacher=teacher, args=TrainingArguments(output_dir=str(tmp_path)))


def test_on_policy_needs_prompts(tmp_path, tokenizer, tiny_pair) -> None:
    _fails(
        tmp_path,
        tokenizer,
        tiny_pair,
        DataError,
        "prompt",
        dataset=arithmetic_dataset(layout="text"),
        args={"lmbda": 1},
    )


class _NaNAtStep(ModelTeacher):
    """A teacher whose hidden states turn NaN at one optimizer step (e.g. an fp16 overflow)."""

    def __init__(self, model, trainer_ref, bad_step):
        super().__init__(model)
        self.trainer_ref, self.bad_step = trainer_ref, bad_step

    def targets(self, input_ids, attention_mask=None, position_ids=None) -> TeacherHead:
        targets = super().targets(input_ids, attention_mask, position_ids)
        if self.trainer_ref[0].state.global_step == self.bad_step:
            targets = TeacherHead(torch.full_like(targets.hidden, float("nan")), targets.weight, targets.bias)
        return targets


def test_nonfinite_loss_stops_after_saving_last_good_weights(tmp_path, tokenizer, tiny_pair) -> None:
    teacher, student = tiny_pair
    trainer_ref: list = [None]
    trainer = Trainer(
        model=student,
        teacher=_NaNAtStep(teacher, trainer_ref, bad_step=3),
        args=config(tmp_path, max_steps=6),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )
    trainer_ref[0] = trainer
    with pytest.raises(NonFiniteLossError, match=r"step 4\b.*checkpoint-3"):
        trainer.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert torch.equal(saved["model.norm.weight"], student.model.norm.weight.detach())


def test_bad_rows_fail_before_the_teacher_weights_load(tmp_path, tokenizer, tiny_pair) -> None:
    """The teacher folder holds only a tokenizer: loading weights would fail, so the data error must come first."""
    _, student = tiny_pair
    teacher_dir = tmp_path / "teacher-without-weights"
    tokenizer.save_pretrained(teacher_dir)
    rows = arithmetic_rows(4, layout="prompt_completion")
    rows[0]["completion"] = ""
    with pytest.raises(DataError, match="0"):
        Trainer(
            model=student,
            teacher=str(teacher_dir),
            args=config(tmp_path / "out"),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )

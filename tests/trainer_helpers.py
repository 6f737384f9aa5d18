"""Shared pieces of the trainer tests: a small arithmetic chat task and a trainer factory."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from distill import DistillConfig, Trainer
from distill.testing import arithmetic_rows, tiny_teacher_student, train_tiny_tokenizer


def arithmetic_dataset(count: int = 32, seed: int = 0, layout: str = "messages") -> Dataset:
    return Dataset.from_list(arithmetic_rows(count, seed, layout))


def config(output_dir: Path | str, **overrides: Any) -> DistillConfig:
    """A fast CPU config: fp32, no saving, a log line every step, deterministic."""
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=16,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        max_length=64,
        max_new_tokens=8,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return DistillConfig(**settings)


def build(tmp_path: Path, tokenizer: Any, pair: tuple[Any, Any], dataset: Dataset | None = None, **overrides: Any):
    teacher, student = pair
    args = config(tmp_path / "out", **overrides)
    return Trainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=dataset if dataset is not None else arithmetic_dataset(),
        processing_class=tokenizer,
    )


def logged(trainer: Trainer, key: str) -> list[float]:
    """Every value of ``key`` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def first_last_mean(values: list[float], window: int = 3) -> tuple[float, float]:
    return sum(values[:window]) / window, sum(values[-window:]) / window


def state_vector(model: torch.nn.Module) -> torch.Tensor:
    """All trainable parameters flattened into one float64 vector (to compare runs)."""
    return torch.cat([p.detach().double().flatten() for p in model.parameters() if p.requires_grad])


@functools.cache
def _taught_teacher_state(vocab_size: int, steps: int = 100) -> dict[str, torch.Tensor]:
    """A tiny teacher trained (plain next-token CE) on the arithmetic task's chat texts.

    A random tiny model is nearly uniform over the vocabulary (entropy ~ln V), which makes KD
    trivially easy; a taught teacher has peaked, task-specific distributions to transfer. Cached
    per process: ~5 s once.
    """
    tokenizer = train_tiny_tokenizer()
    teacher, _ = tiny_teacher_student(vocab_size=vocab_size)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in arithmetic_rows(256, seed=123)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.train()
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (16,), generator=generator)
        loss = teacher(
            input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows], labels=labels[rows]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in teacher.state_dict().items()}


def taught_pair(tokenizer: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(teacher, student)``: a teacher that knows the arithmetic task, and a fresh random student."""
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher.load_state_dict(_taught_teacher_state(len(tokenizer)))
    return teacher, student


def pruned_student(teacher: torch.nn.Module, keep_layers: tuple[int, ...] = (0, 3)) -> torch.nn.Module:
    """A student made from the teacher by keeping only some of its layers (a depth-pruned copy).

    The usual starting point for LoRA distillation: a student that already shares most of the
    teacher's knowledge and is adapted to close the gap.
    """
    from distill.testing import tiny_llama

    config = teacher.config
    student = tiny_llama(
        config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=len(keep_layers),
        intermediate_size=config.intermediate_size,
        seed=7,
    )
    state = {k: v for k, v in teacher.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(keep_layers):
        prefix = f"model.layers.{old}."
        state.update(
            {
                k.replace(prefix, f"model.layers.{new}."): v
                for k, v in teacher.state_dict().items()
                if k.startswith(prefix)
            }
        )
    student.load_state_dict(state)
    return student

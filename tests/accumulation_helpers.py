"""Shared by the accumulation tests and their ``accelerate launch`` script: one optimizer step's gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trainer_helpers import config
from transformers import TrainerCallback

from distill import Trainer
from distill.testing import tiny_teacher_student

ROWS = 8  # one optimizer step holds all of them, however they are split into micro-batches and processes


def uneven_rows(count: int = ROWS) -> Dataset:
    """Prompt/completion rows whose completions hold 1 to ``count`` sentences: micro-batches of very
    different token counts, so weighting them equally gives another gradient than one big batch."""
    rows = []
    for index in range(count):
        a, b = index % 10, (3 * index) % 10
        sentence = f"{a} + {b} = {a + b}. "
        rows.append({"prompt": f"What is {a} plus {b}?\n", "completion": sentence * (1 + (index * 5) % count)})
    return Dataset.from_list(rows)


class GradientsAtFirstStep(TrainerCallback):
    """Keeps the student's gradients just before the first optimizer step (after every micro-batch's backward)."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
                    self.gradients[name.removeprefix("module.")] = grad.detach().double().cpu().clone()


def step_gradients(out: Path, tokenizer: Any, batch: int, accumulation: int, **overrides: Any) -> dict[str, Any]:
    """The student's gradients of one optimizer step over :func:`uneven_rows` (and the trainer that took it)."""
    torch.manual_seed(0)  # the same student, teacher (and hidden-state projections) in every run
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    settings: dict[str, Any] = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,  # the raw gradient (clipping would rescale both alike, but keep it plain)
        generation_temperature=0.0,  # greedy: the same completions however the prompts are batched
        max_length=128,  # no completion cut short: the rows keep their different token counts
        **overrides,
    )
    callback = GradientsAtFirstStep()
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(out, **settings),
        train_dataset=uneven_rows(),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    return {"gradients": callback.gradients, "trainer": trainer}


def max_relative_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    """``max |a - b| / max |b|`` over all parameters (the same names in both)."""
    assert left.keys() == right.keys() and left, (sorted(left), sorted(right))
    scale = max(float(grad.abs().max()) for grad in right.values())
    return max(float((left[name] - right[name]).abs().max()) for name in right) / scale

"""Train the tiny arithmetic task saving every step, and SIGKILL itself in the middle of one checkpoint save.

The kill comes after the model weights of ``checkpoint-<kill-at>`` are written and before its optimizer,
RNG and trainer state: the partial folder a killed save really leaves. Used by tests/test_checkpoint_atomic.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import arithmetic_dataset, config  # noqa: E402

from distill import Trainer  # noqa: E402
from distill.testing import tiny_teacher_student, train_tiny_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", type=int, required=True, help="the step whose checkpoint save is killed")
    cli = parser.parse_args()
    torch.set_num_threads(1)

    save_optimizer = transformers.Trainer._save_optimizer_and_scheduler

    def save_then_maybe_die(self, output_dir):
        if self.state.global_step == cli.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the weights are on disk, the rest of the checkpoint is not
        return save_optimizer(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = save_then_maybe_die
    tokenizer = train_tiny_tokenizer()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    args = config(cli.out, max_steps=cli.kill_at + 2, save_strategy="steps", save_steps=1)
    trainer = Trainer(
        model=student, teacher=teacher, args=args, train_dataset=arithmetic_dataset(), processing_class=tokenizer
    )
    trainer.train()


if __name__ == "__main__":
    from teardown import run

    run(main)

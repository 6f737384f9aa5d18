"""Train the tiny arithmetic task; used by the resume / SIGTERM / SIGKILL / multi-process tests.

Writes ``progress.txt`` (the last finished optimizer step) in the output directory after every step,
and the final trainable weights to ``final.pt``. With ``--step-sleep`` each step also sleeps, so a
test can signal the process mid-run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import arithmetic_dataset, config, state_vector  # noqa: E402

from distill import Trainer  # noqa: E402
from distill.testing import tiny_teacher_student, train_tiny_tokenizer  # noqa: E402


class Progress(TrainerCallback):
    def __init__(self, path: Path, sleep: float) -> None:
        self.path, self.sleep = path, sleep

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(state.global_step))
            tmp.replace(self.path)
        time.sleep(self.sleep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--lmbda", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--teacher-sharding", default="auto")
    parser.add_argument("--seq-kd", action="store_true")
    parser.add_argument("--hidden-loss-weight", type=float, default=0.0)
    cli = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(cli.out)
    tokenizer = train_tiny_tokenizer()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    saving = dict(save_strategy="steps", save_steps=cli.save_steps) if cli.save_steps else {}
    args = config(
        out,
        max_steps=cli.max_steps,
        lmbda=cli.lmbda,
        teacher_sharding=cli.teacher_sharding,
        seq_kd=cli.seq_kd,
        hidden_loss_weight=cli.hidden_loss_weight,
        **saving,
    )
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
        callbacks=[Progress(out / "progress.txt", cli.step_sleep)],
    )
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    weights = state_vector(trainer.model)
    if trainer.hidden is not None and trainer.hidden.projections is not None:
        weights = torch.cat([weights, state_vector(trainer.hidden)])  # the learned hidden-state maps train too
    if trainer.accelerator.is_main_process:
        torch.save(weights, out / "final.pt")
    # Every rank reports its own weights, so a multi-process test can check they agree.
    rank = trainer.accelerator.process_index
    torch.save(weights, out / f"final-rank{rank}.pt")
    # What this rank holds of the teacher: "DTensor <local elements>" when sharded.
    weight = next(trainer.teacher.model.parameters())
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    (out / f"teacher-rank{rank}.txt").write_text(f"{type(weight).__name__} {local.numel()}")


if __name__ == "__main__":
    from teardown import run

    run(main)

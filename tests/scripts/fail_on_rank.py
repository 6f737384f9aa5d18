"""Train the tiny task under ``accelerate launch`` with a failure injected on one rank only.

``--kind nan``: that rank's teacher gives NaN hidden states at one step (the loss goes non-finite there);
``--kind server``: its teacher raises ``ServerError`` as a ``ServerTeacher`` does after its retries (the
teacher is marked remote, as a server teacher is); ``--kind sigterm``: that rank gets SIGTERM.
``--ensemble``: two teachers (a per-token mixture); the failure comes from the second one, ``"b"``.
Each rank writes ``stopped-rank<r>.txt`` (the step it stopped at, the exception and its message).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import arithmetic_dataset, config  # noqa: E402

from distill import NonFiniteLossError, Trainer, TrainingPreempted  # noqa: E402
from distill.losses import TeacherHead  # noqa: E402
from distill.teachers.server import ServerError  # noqa: E402
from distill.testing import tiny_teacher_student, train_tiny_tokenizer  # noqa: E402


class SigtermAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kind", choices=["nan", "server", "sigterm"], required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--at-step", type=int, default=2, help="global_step (finished steps) when it fails")
    parser.add_argument("--ensemble", action="store_true", help="two teachers; the second one fails")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(cli.out)
    tokenizer = train_tiny_tokenizer()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    teachers = {"a": teacher, "b": tiny_teacher_student(vocab_size=len(tokenizer), seed=5)[0]}
    trainer = Trainer(
        model=student,
        teacher=teachers if cli.ensemble else teacher,
        args=config(out, max_steps=6, gradient_accumulation_steps=2, teacher_prefetch=0),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
        teacher_processing_class=[tokenizer, tokenizer] if cli.ensemble else None,
    )
    rank = trainer.accelerator.process_index
    failing = trainer.teachers[1] if cli.ensemble else trainer.teacher
    targets = failing.targets
    if cli.kind == "server":
        failing.prefetchable = True  # remote, as a ServerTeacher: every rank checks it before the student

    def failing_targets(input_ids, attention_mask=None, position_ids=None):
        result = targets(input_ids, attention_mask, position_ids)
        if trainer.state.global_step == cli.at_step:
            if cli.kind == "server":
                raise ServerError("The teacher server at http://127.0.0.1:9/v1/completions did not answer (injected).")
            result = TeacherHead(torch.full_like(result.hidden, float("nan")), result.weight, result.bias)
        return result

    if rank == cli.rank:
        if cli.kind == "sigterm":
            trainer.add_callback(SigtermAt(cli.at_step))
        else:
            failing.targets = failing_targets
    try:
        trainer.train()
        outcome = "finished"
    except (NonFiniteLossError, ServerError, TrainingPreempted) as error:
        outcome = f"{type(error).__name__}: {error}"
    (out / f"stopped-rank{rank}.txt").write_text(f"{trainer.state.global_step}\n{outcome}")
    dist.barrier()  # both ranks have written their report before either exits


if __name__ == "__main__":
    from teardown import run

    run(main)

#!/usr/bin/env python
"""DeepSpeed ZeRO-3 on a CPU (gloo): a tiny distill run, dense loss, fused loss (refused), and the fused loss with
the partitioned head gathered around it (the experiment of issue 17; DeepSpeed is not a distill dependency).

Run in a venv that has DeepSpeed (``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed``), 2 processes::

    DS_ACCELERATOR=cpu PYTHONPATH=src accelerate launch --config_file benchmarks/zero3_cpu.yaml \\
        benchmarks/zero3_cpu.py OUT dense|fused|gathered

Each rank writes ``OUT/result-<mode>-<rank>.json``: whether ZeRO-3 is on, whether the teacher was FSDP2-sharded,
the student's head shape outside a forward (ZeRO-3's ``(0,)`` placeholder), and the training loss or the error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from trainer_helpers import arithmetic_dataset, config  # noqa: E402

from distill import Trainer  # noqa: E402
from distill.losses.fused import fused_objective_loss  # noqa: E402
from distill.models.decoder import final_hidden_states, output_head_of  # noqa: E402
from distill.testing import tiny_teacher_student, train_tiny_tokenizer  # noqa: E402


class GatheredHeadTrainer(Trainer):
    """The fused loss with ZeRO-3's partitioned head gathered (``GatheredParameters``) around the loss call.

    The forward gets the whole head; the backward does not (the head is partitioned again by then, and no
    module hook re-gathers it for a weight read outside its module's forward).
    """

    def _loss(self, model, input_ids, attention_mask, position_ids, targets, teacher_targets):  # type: ignore[override]
        import deepspeed

        hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
        head = output_head_of(model)  # gathered after the decoder: a tied head is released by the embedding's hook
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            return fused_objective_loss(
                hidden, head.weight, teacher_targets, targets, self.objective, chunk_size=self.args.loss_chunk_size
            )


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    rank = int(os.environ.get("RANK", 0))
    for name, model in (("student", student), ("teacher", teacher)):  # by path: the student loads under zero.Init
        model.save_pretrained(out / f"{name}-{rank}")
        tokenizer.save_pretrained(out / f"{name}-{rank}")
    implementation = "dense" if mode == "gathered" else mode  # "gathered" passes the refusal, then turns fused on
    args = config(out / f"run-{mode}", max_steps=2, loss_implementation=implementation, teacher_prefetch=0)
    result: dict[str, Any] = {}
    try:
        trainer = (GatheredHeadTrainer if mode == "gathered" else Trainer)(
            model=str(out / f"student-{rank}"), teacher=str(out / f"teacher-{rank}"), args=args,
            train_dataset=arithmetic_dataset(16), processing_class=tokenizer,
        )  # fmt: skip
        result["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage
        result["teacher_sharded"] = trainer._teacher_sharded
        result["student_head_shape"] = list(trainer.model.get_output_embeddings().weight.shape)
        if mode == "gathered":
            trainer.args.loss_implementation = "fused"
        result["training_loss"] = trainer.train().training_loss
        result["status"] = "ok"
    except Exception as error:  # the point is to record what happens
        result["status"] = f"{type(error).__name__}: {error}"
        result["trace"] = traceback.format_exc()[-2500:]
    (out / f"result-{mode}-{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    print(rank, json.dumps({key: value for key, value in result.items() if key != "trace"}, default=str))


if __name__ == "__main__":
    main()

"""Where the teacher is when it is sharded: ``accelerate launch`` with 2 gloo processes, a teacher given by path.

For ``fsdp_cpu_ram_efficient_loading`` off, then on, a Trainer with ``teacher_sharding="fsdp"`` is built and
``shard_teacher`` is watched: where the teacher's parameters are when it is called, whether the teacher was
moved whole (``ModelTeacher.place`` with a device) before it, and each process's parameter bytes after it.
Then the sharded teacher's logits are compared with the same teacher loaded whole. Each rank writes
``placement-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import arithmetic_dataset, config  # noqa: E402

import distill.trainer.trainer as trainer_module  # noqa: E402
from distill import Trainer  # noqa: E402
from distill.teachers import ModelTeacher  # noqa: E402
from distill.testing import tiny_teacher_student, train_tiny_tokenizer  # noqa: E402


def local_bytes(model: torch.nn.Module) -> int:
    """This process's bytes of ``model``'s parameters (a DTensor counts its local shard)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def watch() -> dict:
    """Record what shard_teacher sees, and every whole move of a teacher before it, in the returned dict (cleared
    by the caller between runs)."""
    original_shard, original_place = trainer_module.shard_teacher, ModelTeacher.place
    record: dict = {"placed_before_sharding": []}

    def place(self, device):
        if device is not None and "sharded_at" not in record:
            record["placed_before_sharding"].append(str(device))
        return original_place(self, device)

    def shard(model, device):
        record["devices_at_sharding"] = sorted({str(param.device) for param in model.parameters()})
        record["whole_bytes"] = sum(param.numel() * param.element_size() for param in model.parameters())
        result = original_shard(model, device)
        record["sharded_at"] = str(device)
        return result

    trainer_module.shard_teacher, ModelTeacher.place = shard, place
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    rank = int(os.environ["RANK"])
    folder = out / f"teacher-rank{rank}"  # each rank its own copy (the same seeded weights): no write race
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    input_ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
    results, record = {}, watch()
    for name, ram_efficient in (("whole_on_every_rank", False), ("ram_efficient", True)):
        if ram_efficient:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        record.clear()
        record["placed_before_sharding"] = []
        trainer = Trainer(
            model=student,
            teacher=str(folder),
            args=config(out / name, max_steps=1, teacher_sharding="fsdp", teacher_prefetch=0),
            train_dataset=arithmetic_dataset(8),
            processing_class=tokenizer,
        )
        record["teacher_sharded"] = trainer._teacher_sharded
        record["local_bytes"] = local_bytes(trainer.teacher.model)
        targets = trainer.teacher.targets(input_ids, mask)
        logits = targets.hidden @ targets.weight.T
        record["max_logit_difference"] = float((logits - expected).abs().max())
        record["logit_scale"] = float(expected.abs().max())
        results[name] = dict(record)
        os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    # A teacher loaded in another dtype on rank 1: every rank refuses before any broadcast (none hangs in one).
    from distill.teachers.sharding import fill_shards_from, shard_teacher, whole_weights

    odd = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if rank == 1 else torch.float32)
    whole = whole_weights(odd) if rank == 0 else None
    shard_teacher(odd, torch.device("cpu"))
    try:
        fill_shards_from(odd, whole, torch.device("cpu"))
        results["mismatch"] = "filled"
    except ValueError as error:
        results["mismatch"] = str(error)
    (out / f"placement-rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()


if __name__ == "__main__":
    from teardown import run

    run(main)

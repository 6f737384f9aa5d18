"""The fused loss's gradient with an FSDP2-sharded student (2 gloo processes) against the unsharded student.

Run with ``python -m torch.distributed.run --nproc_per_node 2``. The student is sharded as accelerate < 1.13
did (every decoder layer, then the root, all with ``reshard_after_forward=True``); each rank trains on its
own micro-batch and FSDP averages the gradients. The reference is the same student unsharded, with the mean
of both ranks' gradients. Rank 0 writes ``result.json``: per precision, the largest relative gradient
difference, the head / hidden dtypes at loss time, and whether the head was a DTensor shard after a plain
forward (the defect this guards against).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distill.losses import fused_distillation_loss
from distill.teachers import ModelTeacher, final_hidden_states, output_head_of
from distill.teachers.sharding import head_unsharded_through_loss, is_sharded, student_weight
from distill.testing import tiny_teacher_student
from distill.trainer.batching import next_token_labels

VOCAB = 512


def batch(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s micro-batch: 3 rows, right-padded, a different number of loss tokens per rank."""
    generator = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9 - 3 * rank :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor], teacher: ModelTeacher) -> torch.Tensor:
    """The trainer's fused path: final hidden states and the plain head inside head_unsharded_through_loss."""
    targets = teacher.targets(inputs["input_ids"], inputs["attention_mask"])
    with head_unsharded_through_loss(model):
        hidden = final_hidden_states(model, inputs["input_ids"], inputs["attention_mask"])
        head = output_head_of(model)
        weight = student_weight(head.weight)
        dtypes = (str(weight.dtype), str(hidden.dtype))
        output = fused_distillation_loss(
            hidden, weight, targets, next_token_labels(inputs["labels"]), "jsd", beta=0.5, chunk_size=7
        )
    loss_of.dtypes = dtypes  # type: ignore[attr-defined]
    return output.loss


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher_model, student = tiny_teacher_student(vocab_size=VOCAB)
    teacher = ModelTeacher(teacher_model.eval().requires_grad_(False))
    reference = copy.deepcopy(student)
    for other in range(world):  # FSDP averages the ranks' gradients: the reference does the same
        (loss_of(reference, batch(other), teacher) / world).backward()
    expected = {name: param.grad.double() for name, param in reference.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for precision, param_dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        sharded = copy.deepcopy(student)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        fully_shard(sharded, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        with torch.no_grad():  # a plain forward: the root reshards its head afterwards (the defect)
            final_hidden_states(sharded, batch(rank)["input_ids"], batch(rank)["attention_mask"])
        head_sharded_after_plain_forward = is_sharded(output_head_of(sharded).weight)
        loss_of(sharded, batch(rank), teacher).backward()
        difference, scale = 0.0, 0.0
        for name, param in sharded.named_parameters():
            grad = param.grad.full_tensor().double()
            difference = max(difference, float((grad - expected[name]).abs().max()))
            scale = max(scale, float(expected[name].abs().max()))
        results[precision] = {
            "relative_difference": difference / scale,
            "head_dtype": loss_of.dtypes[0],  # type: ignore[attr-defined]
            "hidden_dtype": loss_of.dtypes[1],  # type: ignore[attr-defined]
            "head_sharded_after_plain_forward": head_sharded_after_plain_forward,
            "head_sharded_after_step": is_sharded(output_head_of(sharded).weight),
        }
    if rank == 0:
        (out / "result.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

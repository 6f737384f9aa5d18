"""What only a CUDA GPU can check (``pytest -m gpu``; skipped without one). Run by benchmarks/gpu_check.py.

bf16 end to end, the fused loss equal to the dense one on CUDA, a 4-bit teacher through bitsandbytes, and an
FSDP2-sharded student on one GPU (the head kept unsharded through the fused loss).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from trainer_helpers import arithmetic_dataset, config, logged

from distill import Trainer
from distill.losses import TeacherHead, distillation_loss, fused_distillation_loss
from distill.teachers import ModelTeacher, final_hidden_states, output_head_of
from distill.teachers.sharding import head_unsharded_through_loss, student_weight
from distill.testing import tiny_llama, tiny_teacher_student
from distill.trainer.batching import next_token_labels

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_bf16_end_to_end(tmp_path, tokenizer) -> None:
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    trainer = Trainer(model=student, teacher=teacher, args=config(tmp_path, bf16=True, use_cpu=False, max_steps=12),
                      train_dataset=arithmetic_dataset(), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    losses = logged(trainer, "loss")
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert next(trainer.model.parameters()).is_cuda


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_equals_dense_on_cuda(dtype, tolerance) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 300, 64, 1000
    student_hidden = torch.randn(tokens, hidden_size, generator=generator).to(CUDA, dtype).requires_grad_()
    student_weight_ = (torch.randn(vocab, hidden_size, generator=generator) * 0.1).to(CUDA, dtype).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden_size, generator=generator).to(CUDA, dtype)
    teacher_weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.1).to(CUDA, dtype)
    teacher = TeacherHead(teacher_hidden, teacher_weight, None)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(CUDA)
    fused = fused_distillation_loss(student_hidden, student_weight_, teacher, labels, "jsd", beta=0.5, chunk_size=64)
    fused.loss.backward()
    fused_grads = [student_hidden.grad.clone(), student_weight_.grad.clone()]
    student_hidden.grad = student_weight_.grad = None
    student_logits = (student_hidden @ student_weight_.T).float()
    teacher_logits = (teacher.hidden @ teacher.weight.T).float()
    dense = distillation_loss(student_logits[None], teacher_logits[None], labels[None], "jsd", beta=0.5)
    dense.loss.backward()
    assert torch.allclose(fused.loss.float(), dense.loss.float(), rtol=tolerance, atol=tolerance)
    for ours, reference in zip(fused_grads, (student_hidden.grad, student_weight_.grad), strict=True):
        scale = reference.float().abs().max()
        assert float((ours.float() - reference.float()).abs().max() / scale) < tolerance * 5


def test_4bit_teacher_through_bitsandbytes(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from distill.models import load_causal_lm

    tiny_llama(512, hidden_size=128, num_layers=2, intermediate_size=256, seed=0).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path), dtype=torch.bfloat16, quantization="4bit", device=CUDA)
    teacher = ModelTeacher(model)
    ids = torch.randint(3, 512, (2, 16), device=CUDA)
    targets = teacher.targets(ids, torch.ones_like(ids))
    assert torch.isfinite(targets.hidden.float()).all() and targets.weight.shape[0] == 512


def test_fsdp2_student_on_one_gpu() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    teacher_model, student = tiny_teacher_student(vocab_size=512)
    teacher = ModelTeacher(teacher_model.to(CUDA).eval().requires_grad_(False))
    student = student.to(CUDA)
    reference = copy.deepcopy(student)
    ids = torch.randint(3, 512, (2, 24), device=CUDA)
    mask, labels = torch.ones_like(ids), next_token_labels(ids)
    targets = teacher.targets(ids, mask)

    def step(model: torch.nn.Module) -> None:
        with head_unsharded_through_loss(model):
            hidden = final_hidden_states(model, ids, mask)
            weight = student_weight(output_head_of(model).weight)
            assert weight.dtype == hidden.dtype
            fused_distillation_loss(hidden, weight, targets, labels, "jsd", beta=0.5).loss.backward()

    step(reference)
    mesh = init_device_mesh("cuda", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    step(student)
    for (name, param), ref in zip(student.named_parameters(), reference.parameters(), strict=True):
        grad = param.grad.full_tensor().float()
        assert float((grad - ref.grad).abs().max() / ref.grad.abs().max().clamp(min=1e-12)) < 5e-2, name

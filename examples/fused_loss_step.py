"""One distillation step with the fused loss on real (tiny, random) Llama models, on a CPU.

Shows the data flow the Trainer will use: the student's final hidden states and head weight, the
teacher's final hidden states and head (computed without grad), one fused loss, one backward. No
``[tokens x vocab]`` logits are built for either model. Run: ``python examples/fused_loss_step.py``.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.losses import TeacherHead, fused_distillation_loss


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    """A small random Llama built from its config (no download)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def main() -> None:
    vocab = 4096
    teacher = tiny_llama(hidden=128, layers=4, vocab=vocab, seed=0).eval().requires_grad_(False)
    student = tiny_llama(hidden=64, layers=2, vocab=vocab, seed=1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    input_ids = torch.randint(0, vocab, (4, 64))
    labels = input_ids[:, 1:].clone()
    labels[:, :16] = -100  # e.g. the prompt: no loss there, and no compute either

    for step in range(5):
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=input_ids).last_hidden_state[:, :-1]
        student_hidden = student.model(input_ids=input_ids).last_hidden_state[:, :-1]
        out = fused_distillation_loss(
            student_hidden, student.lm_head.weight, TeacherHead(teacher_hidden, teacher.lm_head.weight), labels,
            divergence="jsd", beta=0.5, ce_weight=0.1,
        )  # fmt: skip
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        print(
            f"step {step}: loss {out.loss.item():.4f}  kd {out.kd_loss.item():.4f}  ce {out.ce_loss.item():.4f}  "
            f"top-1 agreement {out.top1_agreement.item():.3f} over {out.num_tokens} tokens"
        )


if __name__ == "__main__":
    main()

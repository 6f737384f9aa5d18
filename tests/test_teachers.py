"""Teachers and the decoder/head split: the hidden states and head give exactly the model's logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.teachers import ModelTeacher, UnsupportedModelError, final_hidden_states, output_head_of
from distill.testing import tiny_llama, tiny_qwen2


class _NoLogitsToKeep(nn.Module):
    """A causal LM wrapper whose forward predates ``logits_to_keep``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def get_decoder(self) -> nn.Module:
        return self.inner.model

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_hidden_states_and_head_reproduce_the_logits(build, seed) -> None:
    model = build(vocab_size=300, seed=seed % 1000).eval()
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = final_hidden_states(model, ids, mask)
        head = output_head_of(model)
        rebuilt = hidden @ head.weight.T + (0 if head.bias is None else head.bias)
        torch.testing.assert_close(rebuilt, logits, atol=1e-5, rtol=1e-5)
        old_style = final_hidden_states(_NoLogitsToKeep(model), ids, mask)
    torch.testing.assert_close(old_style, hidden)


def test_model_teacher_is_frozen_and_gives_its_logits() -> None:
    model = tiny_llama(vocab_size=300, seed=5)
    teacher = ModelTeacher(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 300, (3, 7))
    targets = teacher.targets(ids, torch.ones_like(ids))
    assert not targets.hidden.requires_grad and teacher.vocab_rows == 300
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(targets.hidden @ targets.weight.T, logits, atol=1e-5, rtol=1e-5)


def test_a_lora_wrapped_head_is_refused_for_the_fused_loss() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(vocab_size=300), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(UnsupportedModelError, match="loss_implementation='dense'"):
        output_head_of(model)


def test_data_teacher_trains_plain_cross_entropy(tokenizer, tmp_path) -> None:
    """Forward KL from the one-hot next token is the CE: the trainer's loss equals the model's own LM loss."""
    from trainer_helpers import arithmetic_dataset, config

    from distill import Trainer
    from distill.teachers import DataTeacher
    from distill.testing import tiny_llama

    student = tiny_llama(len(tokenizer), seed=3)
    args = config(tmp_path / "sft", loss="forward_kl", max_steps=2)
    trainer = Trainer(
        model=student, teacher=DataTeacher(len(tokenizer)), args=args, train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = trainer.compute_loss(student, batch)
    reference = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(ours, reference.loss, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2

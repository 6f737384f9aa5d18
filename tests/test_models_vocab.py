"""Tokenizer-level vocabulary checks, and the fused loss on real (tiny) models with padded heads."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from distill.losses import TeacherHead, VocabularyMismatchError, distillation_loss, fused_distillation_loss
from distill.models import check_tokenizers_match, shared_vocab_size
from distill.testing import tiny_llama, train_tiny_tokenizer

ENGLISH = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 20
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 20


@pytest.fixture(scope="module")
def english_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer(300, [ENGLISH])


def test_same_tokenizer_shares_every_id(english_tokenizer: PreTrainedTokenizerFast) -> None:
    assert check_tokenizers_match(english_tokenizer, english_tokenizer) == len(english_tokenizer)


def test_added_tokens_at_the_end_share_the_common_prefix(english_tokenizer: PreTrainedTokenizerFast) -> None:
    extended = train_tiny_tokenizer(300, [ENGLISH])
    extended.add_tokens(["<think>", "</think>"], special_tokens=True)
    assert len(extended) == len(english_tokenizer) + 2
    assert check_tokenizers_match(extended, english_tokenizer) == len(english_tokenizer)


def test_different_tokenizers_are_refused_with_examples(english_tokenizer: PreTrainedTokenizerFast) -> None:
    code_tokenizer = train_tiny_tokenizer(300, [CODE])
    with pytest.raises(VocabularyMismatchError, match=r"tokenizers differ.*map to different tokens.*id \d+ is"):
        check_tokenizers_match(english_tokenizer, code_tokenizer)


def test_shared_vocab_size_checks_the_heads(english_tokenizer: PreTrainedTokenizerFast) -> None:
    size = len(english_tokenizer)
    assert shared_vocab_size(english_tokenizer, english_tokenizer, size + 16, size + 40) == size
    with pytest.raises(VocabularyMismatchError, match="resize_token_embeddings"):
        shared_vocab_size(english_tokenizer, english_tokenizer, size - 1, size + 40)


def test_fused_loss_on_real_models_with_padded_heads(english_tokenizer: PreTrainedTokenizerFast) -> None:
    """Qwen-style padding: one tokenizer, heads of different row counts; the fused loss on final hidden
    states equals the dense loss on the models' own logits restricted to the shared range."""
    size = shared_vocab_size(
        english_tokenizer, english_tokenizer, len(english_tokenizer) + 20, len(english_tokenizer) + 44
    )
    student = tiny_llama(len(english_tokenizer) + 20, hidden_size=32, seed=1).eval()
    teacher = tiny_llama(len(english_tokenizer) + 44, hidden_size=48, seed=2).eval()
    batch = english_tokenizer([ENGLISH[:60], CODE[:40]], return_tensors="pt", padding=True)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)

    student_out = student.model(input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        teacher_out = teacher.model(input_ids=input_ids, attention_mask=attention_mask)
    student_hidden = student_out.last_hidden_state[:, :-1]
    teacher_hidden = teacher_out.last_hidden_state[:, :-1]
    fused = fused_distillation_loss(
        student_hidden, student.lm_head.weight, TeacherHead(teacher_hidden, teacher.lm_head.weight), labels,
        "jsd", vocab_size=size, ce_weight=0.5, chunk_size=5,
    )  # fmt: skip
    fused.loss.backward()
    fused_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()

    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        distillation_loss(student_logits, teacher_logits, labels, "jsd")
    dense = distillation_loss(student_logits, teacher_logits, labels, "jsd", vocab_size=size, ce_weight=0.5)
    dense.loss.backward()

    torch.testing.assert_close(fused.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, student.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(fused_grad[size:] == 0), "padding rows of the student head must get no gradient"
    assert fused.num_tokens == int((labels != -100).sum())

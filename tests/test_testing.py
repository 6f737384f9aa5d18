"""The offline test helpers: tokenizer and tiny models are fast, deterministic and real."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.testing import tiny_llama, tiny_qwen2, tiny_teacher_student, train_tiny_tokenizer


def test_tokenizer_trains_fast_and_deterministically() -> None:
    start = time.perf_counter()
    first = train_tiny_tokenizer()
    assert time.perf_counter() - start < 1.0
    assert first.get_vocab() == train_tiny_tokenizer().get_vocab()
    assert len(first) == 512


def test_tokenizer_round_trips_text_and_renders_chat(tokenizer) -> None:  # noqa: ANN001
    text = "def add(a, b):\n    return a + b  # ünïcode too"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(rendered)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"


def test_tiny_models_build_fast_and_forward(tmp_path: Path) -> None:
    start = time.perf_counter()
    llama = tiny_llama(300)
    qwen = tiny_qwen2(300, tie_word_embeddings=True)
    assert time.perf_counter() - start < 1.0
    input_ids = torch.randint(0, 300, (2, 9))
    for model in (llama, qwen):
        assert model(input_ids=input_ids).logits.shape == (2, 9, 300)
    assert qwen.lm_head.weight.data_ptr() == qwen.model.embed_tokens.weight.data_ptr()
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    assert torch.equal(tiny_llama(300).lm_head.weight, llama.lm_head.weight), "same seed, same weights"

    llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)


def test_teacher_student_pair_shares_vocab() -> None:
    teacher, student = tiny_teacher_student(vocab_size=256)
    assert teacher.config.vocab_size == student.config.vocab_size == 256
    assert teacher.config.hidden_size > student.config.hidden_size
    assert teacher.num_parameters() > student.num_parameters()

"""The offline test helpers: the tokenizer and tiny models are fast, deterministic and real."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from distill.testing import tiny_llama, tiny_qwen2, train_tiny_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
RENDERED = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


def test_tokenizer_trains_fast_and_deterministically() -> None:
    start = time.perf_counter()
    first = train_tiny_tokenizer()
    assert time.perf_counter() - start < 1.0
    assert len(first) == 512
    second = train_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str(), "same merges too"
    assert len(train_tiny_tokenizer(vocab_size=300, texts=["hello world " * 50])) <= 300


def test_tokenizer_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    batch = tokenizer(["a", "a longer line of text"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1] == tokenizer.pad_token_id and batch["attention_mask"][0, -1] == 0


@pytest.mark.parametrize(
    "text", ["def add(a, b):\n    return a + b  # ünïcode too", "The capital of France is Paris.", "  \t\n", "数学 🙂"]
)
def test_tokenizer_round_trips_text(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_renders_chatml(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == RENDERED + "<|im_start|>assistant\n"
    first_turn = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert RENDERED.startswith(first_turn), "the prompt is a prefix of the full conversation"
    assert tokenizer(RENDERED)["input_ids"].count(tokenizer.eos_token_id) == 2


def test_tokenizer_save_load_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    assert reloaded.eos_token == tokenizer.eos_token and reloaded.pad_token == tokenizer.pad_token


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_tiny_model_builds_fast_and_forwards(build: Callable[..., PreTrainedModel], tmp_path: Path) -> None:
    tiny_llama(8)  # first-call warm-up (lazy imports) is not what we time
    start = time.perf_counter()
    model = build(300)
    assert time.perf_counter() - start < 1.0
    assert model.training and model.config.vocab_size == 300 and model.dtype == torch.float32
    input_ids = torch.randint(0, 300, (2, 9))
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (2, 9, 300) and torch.isfinite(logits).all()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(build(300).lm_head.weight, model.lm_head.weight), "same seed, same weights"
    assert not torch.equal(build(300, seed=1).lm_head.weight, model.lm_head.weight)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    torch.testing.assert_close(reloaded(input_ids=input_ids).logits, logits)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_tied_embeddings_share_storage(build: Callable[..., PreTrainedModel], tmp_path: Path) -> None:
    model = build(300, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_dtype_and_sizes_are_honoured() -> None:
    model = tiny_qwen2(128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 1
    assert model.model.layers[0].self_attn.q_proj.bias is not None, "Qwen2 keeps its q/k/v biases"
    assert model.config.max_position_embeddings == 512


def test_tiny_pair_fits_the_tokenizer(
    tiny_pair: tuple[LlamaForCausalLM, LlamaForCausalLM], tokenizer: PreTrainedTokenizerFast
) -> None:
    teacher, student = tiny_pair
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert teacher.config.hidden_size == 128 and len(teacher.model.layers) == 4
    assert student.config.hidden_size == 64 and len(student.model.layers) == 2
    input_ids = tokenizer.apply_chat_template(MESSAGES, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert teacher(input_ids=input_ids).logits.shape == student(input_ids=input_ids).logits.shape
    generated = student.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, input_ids.shape[1] + 4)


def test_seed_fixture_seeds_torch(seed: int) -> None:
    first = torch.rand(3)
    torch.manual_seed(seed)
    assert torch.equal(torch.rand(3), first)

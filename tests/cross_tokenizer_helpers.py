"""Tokenizers for the cross-tokenizer tests, trained in-process: byte-level BPE variants, a SentencePiece-like one."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.testing import CHATML_TEMPLATE

HOSTILE = (
    "def héllo(x):\n        return x * 12345 + 0.5  # naïve 中文 🙂 ü\n\n\n"
    "\t\t\tif   x  ==  007:\n" + " " * 40 + "pass\n"
)
CORPUS = [HOSTILE * 2, "héllo wörld ñ 中文 日本語 🙂🙂 " * 5, "12345 678 90 1000000\n" * 5, "    " * 8 + "x\n"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def byte_bpe(vocab_size: int, corpus: list[str], split_digits: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style), optionally splitting digits one by one (Llama-3 style)."""
    tokenizer = Tokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|eot_id|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    wrapped.chat_template = LLAMA3_TEMPLATE
    return wrapped


def sentencepiece_like(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: ``▁`` for spaces, a dummy space before the first word, byte fallback."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped

"""Loading and checking student and teacher models: vocabularies, dtypes, quantization, LoRA, memory; and the
split of a causal LM into its decoder (final hidden states) and output head (:mod:`distill.models.decoder`)."""

from typing import TYPE_CHECKING

from distill._lazy import lazy_exports

# Imported on first use: loading imports torch and transformers, and ``distill merge --help`` should not wait.
if TYPE_CHECKING:
    from distill.models.adapters import apply_peft, check_student_trainable, has_trainable_adapters
    from distill.models.decoder import (
        OutputHead,
        UnsupportedModelError,
        decoder_of,
        final_hidden_states,
        full_logits,
        output_head_of,
    )
    from distill.models.loading import (
        ModelDoesNotFitError,
        check_fits,
        freeze,
        load_causal_lm,
        parameter_bytes,
        resolve_dtype,
    )
    from distill.models.merge import load_snippet, merge_adapters
    from distill.models.quantization import Quantization, is_quantized, make_trainable_4bit_safe, quantization_config
    from distill.models.shrink import evenly_spaced_layers, student_from_teacher
    from distill.models.vocab import VocabularyMismatchError, check_tokenizers_match, eos_token_ids, shared_vocab_size

__all__ = [
    "ModelDoesNotFitError",
    "OutputHead",
    "Quantization",
    "UnsupportedModelError",
    "VocabularyMismatchError",
    "apply_peft",
    "check_fits",
    "check_student_trainable",
    "check_tokenizers_match",
    "decoder_of",
    "eos_token_ids",
    "evenly_spaced_layers",
    "final_hidden_states",
    "freeze",
    "full_logits",
    "has_trainable_adapters",
    "is_quantized",
    "load_causal_lm",
    "load_snippet",
    "make_trainable_4bit_safe",
    "merge_adapters",
    "output_head_of",
    "parameter_bytes",
    "quantization_config",
    "resolve_dtype",
    "shared_vocab_size",
    "student_from_teacher",
]

__getattr__ = lazy_exports(
    __name__, ("adapters", "decoder", "loading", "merge", "quantization", "shrink", "vocab"), __all__
)

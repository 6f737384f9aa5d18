"""Loading and checking student and teacher models (vocabulary checks so far)."""

from distill.models.vocab import VocabularyMismatchError, check_tokenizers_match, shared_vocab_size

__all__ = ["VocabularyMismatchError", "check_tokenizers_match", "shared_vocab_size"]

"""Do the student and teacher speak the same tokens? Checked on the tokenizers, before any weights load.

Token-level distillation compares the two models' distributions id by id, so id ``v`` must be the
same string for both. Models of one family share a tokenizer but often pad their heads differently
(Qwen2.5 has 151,665 tokens and heads of 151,936 or 152,064 rows); :func:`shared_vocab_size` returns
the range both can use, which the losses take as ``vocab_size``.
"""

from __future__ import annotations

from typing import Any, Protocol

from distill.losses.vocab import VocabularyMismatchError

__all__ = ["VocabularyMismatchError", "check_tokenizers_match", "eos_token_ids", "shared_vocab_size"]

_EXAMPLES_SHOWN = 3


class TokenizerLike(Protocol):
    """What the checks need of a tokenizer: ``transformers`` tokenizers all qualify."""

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


def _tokens_by_id(tokenizer: TokenizerLike) -> dict[int, str]:
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}


def check_tokenizers_match(student_tokenizer: TokenizerLike, teacher_tokenizer: TokenizerLike) -> int:
    """Check that every id both tokenizers have maps to the same token; return how many ids they share.

    Tokenizers of different lengths pass when one extends the other (e.g. a few added special tokens
    at the end); the shared range is then the shorter one, and a label or target beyond it is refused
    later by the losses.

    Args:
        student_tokenizer: the student's tokenizer (anything with ``get_vocab()`` and ``len()``).
        teacher_tokenizer: the teacher's tokenizer.

    Returns:
        The number of leading ids both tokenizers share, ``min(len(student), len(teacher))``.

    Raises:
        VocabularyMismatchError: some shared id maps to different tokens; the message counts them,
            shows examples and says what to do instead.
    """
    student_tokens = _tokens_by_id(student_tokenizer)
    teacher_tokens = _tokens_by_id(teacher_tokenizer)
    shared = min(len(student_tokenizer), len(teacher_tokenizer))
    differing = [i for i in range(shared) if student_tokens.get(i) != teacher_tokens.get(i)]
    if not differing:
        return shared
    examples = "; ".join(
        f"id {i} is {student_tokens.get(i)!r} for the student but {teacher_tokens.get(i)!r} for the teacher"
        for i in differing[:_EXAMPLES_SHOWN]
    )
    sizes = f"{len(student_tokenizer):,} and {len(teacher_tokenizer):,} tokens"
    raise VocabularyMismatchError(
        f"The student and teacher tokenizers differ ({sizes}): {len(differing):,} of the {shared:,} ids they share "
        f"map to different tokens ({examples}). Logit distillation compares the two distributions token by "
        "token, so it needs one tokenizer: pick a teacher and student of the same family, or distill on the "
        "teacher's generated text (sequence-level KD), which works across tokenizers."
    )


def shared_vocab_size(
    student_tokenizer: TokenizerLike,
    teacher_tokenizer: TokenizerLike,
    student_head_rows: int,
    teacher_head_rows: int,
) -> int:
    """The ``vocab_size`` to give the losses: the ids both tokenizers share, checked against both heads.

    Head rows beyond the tokenizer are padding (no text ever tokenizes to them); the losses ignore
    them and renormalise both softmaxes over the shared range.

    Args:
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer.
        student_head_rows: rows of the student's LM head (``lm_head.weight.shape[0]``).
        teacher_head_rows: rows of the teacher's LM head.

    Raises:
        VocabularyMismatchError: the tokenizers differ, or a tokenizer has more tokens than a head
            has rows (the tokenizer does not belong to that model).
    """
    shared = check_tokenizers_match(student_tokenizer, teacher_tokenizer)
    for name, rows in (("student", student_head_rows), ("teacher", teacher_head_rows)):
        if rows < shared:
            raise VocabularyMismatchError(
                f"The {name}'s head has {rows:,} rows but the tokenizers share {shared:,} tokens: this tokenizer "
                f"does not belong to the {name} model (or its embeddings were not resized after adding tokens; "
                "call model.resize_token_embeddings(len(tokenizer)))."
            )
    return shared


def eos_token_ids(tokenizer: TokenizerLike, model: Any) -> list[int]:
    """Ids that end a generated completion: the tokenizer's eos and the model's generation config's, sorted."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)

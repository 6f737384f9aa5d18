"""Held-out distillation metrics: how close the student's next-token distribution is to the teacher's.

Rows are prepared exactly as the Trainer prepares them (:func:`distill.data.prepare_dataset`), so
"completion tokens" means the same here as in training: labels other than -100, shifted by one
(position ``i`` predicts token ``i + 1``). Per such token, both models' distributions are compared
over the shared vocabulary (head rows past the tokenizer are padding, as in the losses).

Both models run their decoder only, and their heads are applied to chunks of the scored positions,
so ``[tokens x vocab]`` float32 logits exist one chunk at a time. A model whose head cannot be
split off (a quantized or LoRA-wrapped head, a custom module) falls back to its own full logits,
which then exist for one batch in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checks import check_int
from distill.data import DistillCollator, prepare_dataset
from distill.losses import default_chunk_size
from distill.losses.divergences import forward_kl_per_token
from distill.losses.vocab import check_labels
from distill.models.vocab import shared_vocab_size
from distill.teachers.decoder import UnsupportedModelError, decoder_of, final_hidden_states, output_head_of

__all__ = ["HeldoutMetrics", "heldout_metrics", "load_rows"]

IGNORE_INDEX = -100

# Maps a [chunk, features] slice of the scored positions to [chunk, head_rows] logits.
_ToLogits = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class HeldoutMetrics:
    """Student vs teacher on reference completions, averaged over completion tokens.

    Attributes:
        forward_kl: mean ``KL(teacher || student)`` per completion token, in nats/token (0 = identical).
        top1_agreement: fraction of completion tokens where both models' most likely token is the same.
        student_ce: mean ``-log q_student(reference token)``, in nats/token.
        teacher_ce: mean ``-log p_teacher(reference token)``, in nats/token.
        num_rows: rows evaluated.
        num_tokens: completion tokens scored (the denominator of every mean).
        vocab_size: vocabulary rows both distributions were normalised over.
    """

    forward_kl: float
    top1_agreement: float
    student_ce: float
    teacher_ce: float
    num_rows: int
    num_tokens: int
    vocab_size: int

    @property
    def student_perplexity(self) -> float:
        """``exp(student_ce)``: the student's perplexity on the reference completions (unitless, >= 1)."""
        return math.exp(self.student_ce)

    @property
    def teacher_perplexity(self) -> float:
        """``exp(teacher_ce)``: the teacher's perplexity on the reference completions (unitless, >= 1)."""
        return math.exp(self.teacher_ce)

    def student_metrics(self) -> dict[str, float]:
        """The student's report row: ``ce`` and ``kl`` (nats/token), ``perplexity``, ``top1_agreement`` (fraction)."""
        return {
            "ce": self.student_ce,
            "perplexity": self.student_perplexity,
            "kl": self.forward_kl,
            "top1_agreement": self.top1_agreement,
        }

    def teacher_metrics(self) -> dict[str, float]:
        """The teacher's row: its ``ce`` and ``perplexity``, and ``kl`` 0 / ``top1_agreement`` 1 by definition."""
        return {"ce": self.teacher_ce, "perplexity": self.teacher_perplexity, "kl": 0.0, "top1_agreement": 1.0}

    def as_dict(self) -> dict[str, float]:
        """Every field plus both perplexities, for JSON."""
        return {
            **asdict(self),
            "student_perplexity": self.student_perplexity,
            "teacher_perplexity": self.teacher_perplexity,
        }


def load_rows(source: str | Any, max_rows: int | None = None) -> datasets.Dataset:
    """A dataset from a ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a ``save_to_disk`` folder, or rows.

    Args:
        source: a path, a ``datasets.Dataset``, or a list of row dicts.
        max_rows: keep only the first ``max_rows`` rows.

    Returns:
        The rows as a ``datasets.Dataset``.
    """
    from pathlib import Path

    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(source))
    else:
        path = Path(source).expanduser()
        kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
        if path.is_file() and path.suffix in kinds:
            dataset = datasets.load_dataset(kinds[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(path))
        else:
            raise FileNotFoundError(
                f"No dataset at {str(source)!r}: pass a .json/.jsonl/.parquet/.csv file or a folder written by "
                "Dataset.save_to_disk()."
            )
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows")
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _split_head(model: nn.Module) -> tuple[Any, int]:
    """``(head, rows)``: the model's :class:`OutputHead` (None when it cannot be split off) and its vocabulary rows."""
    try:
        decoder_of(model)
        head = output_head_of(model)
        return head, int(head.weight.shape[0])
    except (UnsupportedModelError, AttributeError):
        pass
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # out_features, not weight.shape: a 4-bit head's weight is stored packed.
    rows = getattr(embeddings, "out_features", None) or model.config.vocab_size
    return None, int(rows)


def _scored(model: nn.Module, head: Any, batch: Mapping[str, Tensor], scored: Tensor) -> tuple[Tensor, _ToLogits]:
    """Features ``[N, *]`` at the ``N`` scored positions of the batch, and how to make logits of a chunk of them."""
    device = _device(model)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    scored = scored.to(device)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][scored], lambda chunk: chunk
    hidden = final_hidden_states(model, input_ids, attention_mask)

    def to_logits(chunk: Tensor) -> Tensor:
        logits = F.linear(chunk.to(head.weight.dtype), head.weight, head.bias)
        return logits if head.softcap is None else head.softcap * torch.tanh(logits / head.softcap)

    return hidden[:, :-1][scored], to_logits


def _chunk_sums(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, vocab_size: int
) -> tuple[float, float, float, float]:
    """Sums over a chunk of ``(forward KL, top-1 matches, student CE, teacher CE)``; logits ``[c, >= vocab_size]``."""
    student_logprobs = student_logits[:, :vocab_size].float().log_softmax(-1)
    teacher_logprobs = teacher_logits[:, :vocab_size].float().to(student_logprobs.device).log_softmax(-1)
    targets = targets.to(student_logprobs.device)[:, None]
    kl = forward_kl_per_token(student_logprobs, teacher_logprobs).sum()
    matches = (student_logprobs.argmax(-1) == teacher_logprobs.argmax(-1)).sum()
    student_ce = -student_logprobs.gather(-1, targets).sum()
    teacher_ce = -teacher_logprobs.gather(-1, targets).sum()
    return float(kl), float(matches), float(student_ce), float(teacher_ce)


@torch.no_grad()
def heldout_metrics(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]] | str,
    *,
    teacher_tokenizer: Any = None,
    max_length: int = 1024,
    batch_size: int = 8,
    max_rows: int | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> HeldoutMetrics:
    """KL, top-1 agreement, cross-entropy and perplexity of a student and its teacher on held-out rows.

    Every mean is over completion tokens: those with a label other than -100 after the shift, as the
    Trainer's loss uses them (``completion_only_loss``; ``text`` rows score every token).

    Args:
        student: a causal LM, on the device it should run on (eval mode is set for the call).
        teacher: the teacher causal LM, on its own device (may differ from the student's).
        tokenizer: the student's tokenizer; rows are tokenized with it.
        dataset: rows in any layout the Trainer accepts (``messages``, ``prompt``/``completion``,
            ``text``, pre-tokenized), as a ``datasets.Dataset``, a list of dicts, or a path
            (see :func:`load_rows`).
        teacher_tokenizer: the teacher's tokenizer, checked against the student's; default: the same.
        max_length: rows are cut to this many tokens, as in training.
        batch_size: rows per forward pass (rows are sorted by length first, to pad less).
        max_rows: evaluate only the first ``max_rows`` rows.
        chunk_size: scored tokens per ``[chunk, vocab]`` float32 block; default
            :func:`distill.losses.default_chunk_size` (128 MiB per block on a CPU, 512 MiB on a GPU).
        vocab_size: shared vocabulary rows; default :func:`distill.models.shared_vocab_size` of the
            tokenizers and both heads (padding rows past the tokenizer are left out).

    Returns:
        The :class:`HeldoutMetrics`.

    Raises:
        distill.data.DataError: rows the Trainer would refuse.
        VocabularyMismatchError: the tokenizers differ, or a tokenizer is larger than a head.
    """
    batch_size = check_int(batch_size, "batch_size")
    rows = load_rows(dataset, max_rows)
    prepared, report = prepare_dataset(rows, tokenizer, max_length=max_length)
    student_head, student_rows = _split_head(student)
    teacher_head, teacher_rows = _split_head(teacher)
    if vocab_size is None:
        vocab_size = shared_vocab_size(tokenizer, teacher_tokenizer or tokenizer, student_rows, teacher_rows)
    chunk = chunk_size or default_chunk_size(vocab_size, _device(student))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    collate = DistillCollator(pad_token_id=pad_id)
    pairs = zip(prepared["input_ids"], prepared["labels"], strict=True)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in pairs]
    examples.sort(key=lambda row: len(row["input_ids"]))

    was_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # KL, top-1 matches, student CE, teacher CE; Python floats are float64
    num_tokens = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            shifted_labels = batch["labels"][:, 1:]
            scored = shifted_labels != IGNORE_INDEX
            targets = shifted_labels[scored]
            check_labels(targets, vocab_size, IGNORE_INDEX)
            student_features, student_logits = _scored(student, student_head, batch, scored)
            teacher_features, teacher_logits = _scored(teacher, teacher_head, batch, scored)
            for first in range(0, len(targets), chunk):
                last = first + chunk
                sums = _chunk_sums(
                    student_logits(student_features[first:last]),
                    teacher_logits(teacher_features[first:last]),
                    targets[first:last],
                    vocab_size,
                )
                totals = [total + value for total, value in zip(totals, sums, strict=True)]
            num_tokens += len(targets)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    kl, matches, student_ce, teacher_ce = (total / max(num_tokens, 1) for total in totals)
    return HeldoutMetrics(
        forward_kl=kl,
        top1_agreement=matches,
        student_ce=student_ce,
        teacher_ce=teacher_ce,
        num_rows=report.num_rows,
        num_tokens=num_tokens,
        vocab_size=vocab_size,
    )

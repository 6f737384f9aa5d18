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
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.checks import check_int
from distill.data import DistillCollator, prepare_dataset
from distill.data.rows import load_rows
from distill.losses import default_chunk_size
from distill.losses.divergences import forward_kl_per_token
from distill.losses.vocab import check_labels
from distill.models.decoder import UnsupportedModelError, decoder_of, final_hidden_states, output_head_of
from distill.models.vocab import shared_vocab_size

__all__ = ["HeldoutMetrics", "heldout_metrics", "heldout_metrics_per_student", "load_rows"]

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
        row_sums: per row, in the order the rows came in, the sums the means are made of: ``tokens``
            (scored tokens), ``kl``, ``top1_agreement`` (matches), ``ce`` (student) and ``teacher_ce``,
            each a tuple of ``num_rows`` floats; what :func:`distill.evaluation.stats.paired_difference`
            resamples. Left out of :meth:`as_dict`.
    """

    forward_kl: float
    top1_agreement: float
    student_ce: float
    teacher_ce: float
    num_rows: int
    num_tokens: int
    vocab_size: int
    row_sums: dict[str, tuple[float, ...]] | None = field(default=None, repr=False, compare=False)

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

    def student_row_sums(self) -> dict[str, tuple[float, ...]] | None:
        """The student's per-row sums (``tokens``, ``ce``, ``kl``, ``top1_agreement``), for paired comparisons."""
        if self.row_sums is None:
            return None
        return {key: self.row_sums[key] for key in ("tokens", "ce", "kl", "top1_agreement")}

    def as_dict(self) -> dict[str, float]:
        """Every field but ``row_sums``, plus both perplexities, for JSON."""
        fields = asdict(self)
        fields.pop("row_sums")
        return {
            **fields,
            "student_perplexity": self.student_perplexity,
            "teacher_perplexity": self.teacher_perplexity,
        }


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

    return hidden[:, :-1][scored], head.logits


# The per-token values _chunk_values returns, in order; also the keys of HeldoutMetrics.row_sums (with "tokens").
_VALUES = ("kl", "top1_agreement", "ce", "teacher_ce")


def _logprobs(logits: Tensor, vocab_size: int) -> Tensor:
    """``[c, vocab_size]`` float32 log-probabilities over the shared vocabulary from ``[c, >= vocab_size]`` logits."""
    return logits[:, :vocab_size].float().log_softmax(-1)


def _teacher_values(teacher_logprobs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(top-1 ids [c], CE [c])`` of the teacher over a chunk: computed once, shared by every student."""
    return teacher_logprobs.argmax(-1), -teacher_logprobs.gather(-1, targets[:, None])[:, 0]


def _chunk_values(
    student_logprobs: Tensor, teacher_logprobs: Tensor, teacher: tuple[Tensor, Tensor], targets: Tensor
) -> Tensor:
    """``[4, c]`` float64 per token: forward KL, top-1 match (0/1), student CE and teacher CE; log-probs ``[c, V]``;
    ``teacher`` is :func:`_teacher_values` of the same chunk."""
    device = student_logprobs.device
    teacher_logprobs = teacher_logprobs.to(device)
    teacher_top1, teacher_ce = (value.to(device) for value in teacher)
    kl = forward_kl_per_token(student_logprobs, teacher_logprobs)
    matches = (student_logprobs.argmax(-1) == teacher_top1).float()
    student_ce = -student_logprobs.gather(-1, targets.to(device)[:, None])[:, 0]
    return torch.stack([kl, matches, student_ce, teacher_ce]).double().cpu()


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
    progress: bool = True,
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
        progress: show a bar of rows scored (rate and ETA).

    Returns:
        The :class:`HeldoutMetrics`.

    Raises:
        distill.data.DataError: rows the Trainer would refuse.
        VocabularyMismatchError: the tokenizers differ, or a tokenizer is larger than a head.
    """
    metrics = heldout_metrics_per_student(
        {"student": student}, teacher, tokenizer, dataset, teacher_tokenizer=teacher_tokenizer,
        max_length=max_length, batch_size=batch_size, max_rows=max_rows, chunk_size=chunk_size,
        vocab_size=vocab_size, progress=progress,
    )  # fmt: skip
    return metrics["student"]


@torch.no_grad()
def heldout_metrics_per_student(
    students: Mapping[str, nn.Module],
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
    progress: bool = True,
) -> dict[str, HeldoutMetrics]:
    """:func:`heldout_metrics` of several students against one teacher, running the teacher once per batch.

    Comparing N students costs N + 1 forward passes per batch instead of 2N (the teacher is usually the
    largest model), and each chunk's teacher log-probabilities are computed once. The students share
    ``tokenizer``; every student's scored features for one batch are held at once. Arguments as
    :func:`heldout_metrics`.

    Returns:
        ``{name: HeldoutMetrics}`` in the order of ``students``.
    """
    if not students:
        raise ValueError("heldout_metrics_per_student needs at least one student.")
    batch_size = check_int(batch_size, "batch_size")
    rows = load_rows(dataset, max_rows=max_rows)
    prepared, report = prepare_dataset(rows, tokenizer, max_length=max_length)
    heads = {name: _split_head(model) for name, model in students.items()}
    teacher_head, teacher_rows = _split_head(teacher)
    if vocab_size is None:
        vocab_size = min(
            shared_vocab_size(tokenizer, teacher_tokenizer or tokenizer, student_rows, teacher_rows)
            for _, student_rows in heads.values()
        )
    chunk = chunk_size or default_chunk_size(vocab_size, _device(next(iter(students.values()))))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    collate = DistillCollator(pad_token_id=pad_id)
    pairs = zip(prepared["input_ids"], prepared["labels"], strict=True)
    examples = [{"input_ids": ids, "labels": labels, "row": row} for row, (ids, labels) in enumerate(pairs)]
    examples.sort(key=lambda example: len(example["input_ids"]))  # shortest first: less padding per batch
    student_heads = {name: (model, heads[name][0]) for name, model in students.items()}

    models = [teacher, *students.values()]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    # Per student and original row: the sums of each per-token value (float64); rows are what a paired bootstrap
    # resamples (distill.evaluation.stats). Scored tokens per row are the same for every student.
    row_sums = {name: torch.zeros(len(_VALUES), len(examples), dtype=torch.float64) for name in students}
    row_tokens = torch.zeros(len(examples), dtype=torch.float64)
    bar = tqdm(total=len(examples), desc="Held-out metrics", unit="row", disable=not progress)
    try:
        for start in range(0, len(examples), batch_size):
            batch_examples = examples[start : start + batch_size]
            _score_batch(batch_examples, collate(batch_examples), (teacher, teacher_head), student_heads,
                         vocab_size, chunk, row_sums, row_tokens)  # fmt: skip
            bar.update(len(batch_examples))
    finally:
        bar.close()
        for model, mode in zip(models, was_training, strict=True):
            model.train(mode)
    return _results(row_sums, row_tokens, report.num_rows, vocab_size)


def _score_batch(
    examples: list[dict[str, Any]],
    batch: dict[str, Tensor],
    teacher: tuple[nn.Module, Any],
    students: dict[str, tuple[nn.Module, Any]],
    vocab_size: int,
    chunk: int,
    row_sums: dict[str, Tensor],
    row_tokens: Tensor,
) -> None:
    """Add one batch's per-token values to each student's per-row sums, ``chunk`` scored tokens at a time.

    Args:
        examples: the batch's examples (their ``row``: the original row index).
        batch: the collated batch (the ``row`` key is ignored).
        teacher: the teacher model and its head.
        students: ``{name: (model, head)}``.
        vocab_size: shared vocabulary rows.
        chunk: scored tokens per ``[chunk, vocab]`` block.
        row_sums: per student, ``[len(_VALUES), rows]`` float64 sums, added to in place.
        row_tokens: ``[rows]`` scored tokens per row, added to in place.
    """
    shifted_labels = batch["labels"][:, 1:]
    scored = shifted_labels != IGNORE_INDEX
    targets = shifted_labels[scored]
    check_labels(targets, vocab_size, IGNORE_INDEX)
    token_rows = torch.tensor([ex["row"] for ex in examples])[scored.nonzero()[:, 0]]  # [tokens]
    row_tokens.index_add_(0, token_rows, torch.ones(len(token_rows), dtype=torch.float64))
    teacher_features, teacher_logits = _scored(*teacher, batch, scored)
    # Every student's features at once (hidden states: small beside a [chunk x vocab] block), so each
    # chunk's teacher distribution is computed once for all of them.
    scored_students = {name: _scored(model, head, batch, scored) for name, (model, head) in students.items()}
    for first in range(0, len(targets), chunk):
        last = first + chunk
        teacher_logprobs = _logprobs(teacher_logits(teacher_features[first:last]), vocab_size)
        teacher_values = _teacher_values(teacher_logprobs, targets[first:last].to(teacher_logprobs.device))
        for name, (student_features, student_logits) in scored_students.items():
            values = _chunk_values(
                _logprobs(student_logits(student_features[first:last]), vocab_size),
                teacher_logprobs,
                teacher_values,
                targets[first:last],
            )
            row_sums[name].index_add_(1, token_rows[first:last], values)


def _results(
    row_sums: dict[str, Tensor], row_tokens: Tensor, num_rows: int, vocab_size: int
) -> dict[str, HeldoutMetrics]:
    """Each student's :class:`HeldoutMetrics` from its per-row sums: means over all scored tokens."""
    num_tokens = int(row_tokens.sum())
    tokens = tuple(row_tokens.tolist())
    results = {}
    for name, sums in row_sums.items():
        kl, matches, student_ce, teacher_ce = (float(total) / max(num_tokens, 1) for total in sums.sum(1))
        results[name] = HeldoutMetrics(
            forward_kl=kl,
            top1_agreement=matches,
            student_ce=student_ce,
            teacher_ce=teacher_ce,
            num_rows=num_rows,
            num_tokens=num_tokens,
            vocab_size=vocab_size,
            row_sums={"tokens": tokens, **dict(zip(_VALUES, map(tuple, sums.tolist()), strict=True))},
        )
    return results

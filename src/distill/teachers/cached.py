"""Sparse (top-k) teachers: one computed live from a model, one read from an offline cache.

* :class:`TopKTeacher`: a :class:`~distill.teachers.ModelTeacher` that hands the loss its top-k
  tokens instead of its head, optionally passed through a cache encoding (so it gives exactly the
  targets a cache would).
* :class:`CachedTeacher`: the top-k targets written once by :func:`distill.cache.build_cache`
  (``distill cache``); trains a student with no teacher model loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.formats.encoding import Encoding
from distill.formats.reader import (
    CacheError,
    CacheMismatchError,
    CacheReader,
    loss_spans,
    row_key,
    tokenizer_fingerprint,
)
from distill.formats.sampling import priority_sample
from distill.losses import Objective, SparseTargets, TeacherHead
from distill.losses.sparse import check_estimate_objective
from distill.teachers.base import Teacher
from distill.teachers.model import ModelTeacher

__all__ = ["CachedTeacher", "TopKTeacher", "sampled_from_hidden", "topk_from_hidden"]

# Positions per head matmul when taking the top-k: one [chunk x V] float32 buffer of ~64 MiB at V = 128k.
_TOPK_CHUNK = 128


def _chunk_logprobs(hidden: Tensor, head: TeacherHead, vocab_size: int, chunk_size: int) -> Iterator[Tensor]:
    """The teacher's float32 log-softmax over head rows ``[0, vocab_size)``, ``chunk_size`` positions at a time."""
    output_head = head.head
    for start in range(0, hidden.shape[0], chunk_size):
        # The matmul in the head's dtype, the logits (and their soft-capping) in float32.
        chunk = hidden[start : start + chunk_size].to(head.weight.dtype)
        logits = output_head.logits(
            chunk, vocab_size, out=chunk.new_empty(chunk.shape[0], vocab_size, dtype=torch.float32)
        )
        yield torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def topk_from_hidden(
    hidden: Tensor, head: TeacherHead, k: int, vocab_size: int, chunk_size: int = _TOPK_CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k tokens at some positions, from its final hidden states and head.

    The log-softmax runs in float32 over the first ``vocab_size`` head rows (the vocabulary shared
    with the student, as the fused loss uses), ``chunk_size`` positions at a time.

    Args:
        hidden: ``[n, H]`` final hidden states of the positions.
        head: the teacher's head (its ``hidden`` field is ignored).
        k: entries per position.
        vocab_size: softmax over head rows ``[0, vocab_size)``.
        chunk_size: positions per matmul.

    Returns:
        ``(ids [n, k] int64, logprobs [n, k] float32, tail_mass [n] float64)``, highest log-prob first;
        the tail is ``-expm1(logsumexp(top-k log-probs))`` in float64 (no cancellation near 0).
    """
    outputs = [logprobs.topk(k, dim=-1) for logprobs in _chunk_logprobs(hidden, head, vocab_size, chunk_size)]
    if not outputs:
        empty = hidden.new_zeros(0, k)
        return empty.long(), empty.float(), hidden.new_zeros(0, dtype=torch.float64)
    ids = torch.cat([pair.indices for pair in outputs])
    logprobs = torch.cat([pair.values for pair in outputs])
    tail = (-torch.expm1(torch.logsumexp(logprobs.double(), dim=-1))).clamp(0.0, 1.0)
    return ids, logprobs, tail


@torch.no_grad()
def sampled_from_hidden(
    hidden: Tensor,
    head: TeacherHead,
    k: int,
    vocab_size: int,
    generator: torch.Generator,
    chunk_size: int = _TOPK_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled targets (:func:`distill.formats.sampling.priority_sample`) at some positions.

    Args and the chunked log-softmax as :func:`topk_from_hidden`; ``generator`` (on ``hidden``'s
    device) draws the positions' uniforms in order.

    Returns:
        ``(ids [n, k] int64, log_weights [n, k] float32, tail_mass [n] float64 zeros)``.
    """
    pairs = [priority_sample(lp, k, generator) for lp in _chunk_logprobs(hidden, head, vocab_size, chunk_size)]
    if not pairs:
        empty = hidden.new_zeros(0, k)
        return empty.long(), empty.float(), hidden.new_zeros(0, dtype=torch.float64)
    ids = torch.cat([pair[0] for pair in pairs])
    return ids, torch.cat([pair[1] for pair in pairs]), hidden.new_zeros(ids.shape[0], dtype=torch.float64)


def _dummy_targets(batch: int, length: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Valid filler targets (ids ``0..k-1``, uniform, no tail) for positions that carry no loss."""
    ids = torch.arange(k, dtype=torch.long).expand(batch, length, k).clone()
    logprobs = torch.full((batch, length, k), -math.log(k), dtype=torch.float32)
    return ids, logprobs, torch.zeros(batch, length, dtype=torch.float32)


class TopKTeacher(ModelTeacher):
    """A live model teacher that gives the loss only its top-k tokens per position.

    With ``encoding`` the targets go through that cache encoding and back, so they equal what
    :class:`CachedTeacher` would read from a cache built with the same settings.

    Args:
        model: the teacher model.
        k: entries per position.
        encoding: ``None`` (exact float32 log-probs), ``"compact"`` or ``"fp16"``.
        vocab_size: softmax range; default all head rows.
        kwargs: as :class:`~distill.teachers.ModelTeacher` (``tokenizer``, ``device``, ``dtype``).
    """

    def __init__(
        self, model: nn.Module, k: int, *, encoding: str | None = None, vocab_size: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        self.k = k
        self.vocab_size = vocab_size or self.vocab_rows
        self.encoding = None if encoding is None else Encoding(encoding, k, self.vocab_rows)

    @torch.no_grad()
    def targets(  # type: ignore[override]
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> SparseTargets:
        """``[batch, seq, k]`` top-k ids and log-probs and ``[batch, seq]`` tail mass."""
        head = super().targets(input_ids, attention_mask, position_ids)
        batch, length = input_ids.shape
        ids, logprobs, tail = topk_from_hidden(head.hidden.reshape(batch * length, -1), head, self.k, self.vocab_size)
        if self.encoding is not None:
            encoded = self.encoding.encode(ids.cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy())
            ids_np, logprobs_np, tail_np = self.encoding.decode(encoded)
            ids, logprobs, tail = (torch.from_numpy(a).to(input_ids.device) for a in (ids_np, logprobs_np, tail_np))
        return SparseTargets(
            ids.reshape(batch, length, self.k),
            logprobs.float().reshape(batch, length, self.k),
            tail.float().reshape(batch, length),
        )


class CachedTeacher(Teacher):
    """A teacher read from an offline top-k cache (:func:`distill.cache.build_cache`, ``distill cache``).

    No model is loaded: :meth:`targets` hashes each batch row's token ids, finds the row in the
    cache and returns its stored top-k entries at the positions that carry loss (valid filler
    elsewhere, which the loss never reads). Use it with ``sparse_tail="bucket"`` (temperature 1)
    or ``"renormalize"``.

    Args:
        path: the cache folder.
        tokenizer: the student's tokenizer; when given, its fingerprint must match the cache's.

    Attributes:
        tokenizer: always ``None`` (the check above replaces the trainer's tokenizer comparison).
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: Path | str, *, tokenizer: Any = None) -> None:
        self.reader = CacheReader(path)
        self.manifest = self.reader.manifest
        self.tokenizer = None
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    @property
    def k(self) -> int:
        return int(self.manifest["config"]["k"])

    @property
    def vocab_rows(self) -> int:
        return int(self.manifest["config"]["teacher"]["vocab_rows"])

    @property
    def sampled(self) -> bool:
        """Whether the cache holds sampled targets (unbiased weights; forward KL only) rather than the top-k."""
        return self.reader.sampled

    def check_objective(self, objective: Objective) -> None:
        """Refuse, before training, a loss that this cache's targets cannot train without bias."""
        if self.sampled:
            check_estimate_objective(objective)

    def check_config(self, args: Any) -> None:
        """Refuse, before training, settings a cache cannot serve (each would otherwise fail at step 1, or be wrong).

        Raises:
            CacheError: ``seq_kd`` (a cache cannot generate), ``lmbda > 0`` (the student's own completions are
                not in the cache), ``packing`` (rows are looked up one by one), or ``temperature != 1`` with
                ``sparse_tail="bucket"`` (the cached log-probs are at temperature 1 and the tail mass cannot be
                re-tempered).
        """
        problems = []
        if getattr(args, "seq_kd", False):
            problems.append("seq_kd=True (a cache cannot generate the teacher's completions)")
        if getattr(args, "lmbda", 0.0) > 0:
            problems.append(
                f"lmbda={args.lmbda} (on-policy steps train on the student's own completions, which are not in the "
                "cache; use the teacher model in-process or a ServerTeacher)"
            )
        if getattr(args, "packing", False):
            problems.append("packing=True (cached rows are found one row at a time; set packing=False)")
        temperature = getattr(args, "temperature", 1.0)
        if temperature != 1.0 and getattr(args, "sparse_tail", "bucket") == "bucket":
            problems.append(
                f"temperature={temperature} with sparse_tail='bucket' (the cache holds temperature-1 log-probs and "
                "one tail mass, which cannot be re-tempered; use temperature=1, or sparse_tail='renormalize')"
            )
        if problems:
            raise CacheError(f"A CachedTeacher ({self.reader.path}) cannot train with " + "; ".join(problems) + ".")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the one the cache was built with (vocabulary, specials, template)."""
        expected = self.manifest["config"]["tokenizer"]
        found = tokenizer_fingerprint(tokenizer)
        if found != expected["fingerprint"]:
            raise CacheMismatchError(
                f"The cache {self.reader.path} was built with another tokenizer: its fingerprint is "
                f"{expected['fingerprint'][:16]}... ({expected['size']:,} tokens), this tokenizer's is "
                f"{found[:16]}... ({len(tokenizer):,} tokens). Cached ids would mean other tokens: use the "
                "tokenizer the cache was built with (vocabulary, special tokens and chat template must all match), "
                "or rebuild the cache."
            )

    def verify(self) -> None:
        """Check every shard's sha256 (otherwise each is checked when first read)."""
        self.reader.verify()

    def check_dataset(self, rows: Any) -> None:
        """Check that every prepared row is cached at every position where it carries loss.

        Args:
            rows: the output of :func:`distill.data.prepare_dataset` (``input_ids`` and ``labels``).

        Raises:
            CacheMissError: a row is not in the cache.
            CacheMismatchError: a row carries loss where the cache has no targets (e.g. the cache was
                built with ``completion_only_loss=True`` and training uses ``False``).
        """
        for index, (input_ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            positions = self.reader.positions(row_key(input_ids))
            spans = np.asarray(loss_spans(labels)).reshape(-1, 2)
            needed = np.concatenate([np.arange(s, e) for s, e in spans]) if len(spans) else np.zeros(0)
            if not np.isin(needed, positions).all():
                raise CacheMismatchError(
                    f"Row {index} carries loss at positions the cache has no targets for. Compare "
                    f"completion_only_loss (the cache's: {self.manifest['config']['completion_only_loss']})."
                )

    def targets(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> SparseTargets:
        """``[batch, seq, k]`` cached top-k ids / log-probs and ``[batch, seq]`` tail mass.

        Args:
            input_ids: ``[batch, seq]`` right-padded token ids.
            attention_mask: ``[batch, seq]`` 1 for real tokens; required (packed batches are not supported).
            position_ids: unused.

        Raises:
            CacheMissError: a row is not in the cache.
        """
        if attention_mask is None:
            raise CacheError(
                "CachedTeacher does not support packed batches (attention_mask=None) yet: train with packing=False."
            )
        batch, length = input_ids.shape
        ids, logprobs, tail = _dummy_targets(batch, length, self.k)
        lengths = attention_mask.sum(dim=1).tolist()
        rows = input_ids.cpu()
        for b, row_length in enumerate(lengths):
            row_length = int(row_length)
            if row_length and int(attention_mask[b, :row_length].sum()) != row_length:
                raise CacheError("CachedTeacher needs right-padded rows (attention_mask 1...1 0...0).")
            positions, row_ids, row_logprobs, row_tail = self.reader.lookup(row_key(rows[b, :row_length].numpy()))
            index = torch.from_numpy(positions)
            ids[b, index] = torch.from_numpy(row_ids)
            logprobs[b, index] = torch.from_numpy(row_logprobs)
            tail[b, index] = torch.from_numpy(row_tail)
        device = input_ids.device
        return SparseTargets(ids.to(device), logprobs.to(device), tail.to(device), estimate=self.sampled)

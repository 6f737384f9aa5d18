"""Building a top-k cache: run a teacher once over a dataset, store its targets (format: ``docs/offline.md``).

The folder is a :class:`distill.shards.ShardFolder` (crash safety, resumption, several processes): shard
``s`` always holds rows ``[s * rows_per_shard, (s + 1) * rows_per_shard)`` of the prepared dataset and
its bytes depend on nothing else, so a restarted build, with any number of processes, recomputes exactly
the missing shards and the finished cache is byte-identical to an uninterrupted one-process build. Under
``accelerate launch`` / ``torchrun`` every rank computes its share of the shards; rank 0 writes the
manifest. A folder holding anything but a cache (or an unfinished one, to resume) is refused before any
model is loaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from distill.checks import InputError, check_int
from distill.data import prepare_dataset
from distill.formats.encoding import ENCODINGS, Encoding
from distill.formats.reader import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheMismatchError,
    config_checksums,
    loss_spans,
    read_manifest,
    row_key,
    spans_to_positions,
    tokenizer_fingerprint,
)
from distill.formats.sampling import row_generator
from distill.losses import SparseTargets
from distill.models import is_quantized, load_causal_lm, resolve_dtype
from distill.models.loading import check_model_source, load_tokenizer
from distill.shards import Ranks, ShardFolder, progress_bar, rank_device
from distill.teachers.cached import sampled_from_hidden, topk_from_hidden
from distill.teachers.model import ModelTeacher
from distill.teachers.server import ServerTeacher

__all__ = ["SHARD_SCHEMA", "build_cache", "check_cache_folder"]

# Settings compared with an existing manifest before the teacher is loaded (the rest need the teacher and data).
_EARLY_SETTINGS = ("k", "targets", "seed", "max_length", "completion_only_loss", "rows_per_shard", "batch_tokens",
                   "compression")  # fmt: skip
ROW_GROUP_ROWS = 64
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("num_tokens", pa.int32()),
        ("spans", pa.list_(pa.int32())),
        ("ids", pa.binary()),
        ("logprobs", pa.binary()),
        ("mass", pa.binary()),
    ]
)


def _cache_folder(out_dir: str | os.PathLike, name: str = "out_dir") -> ShardFolder:
    return ShardFolder(out_dir, what="top-k cache", settings_file=MANIFEST_NAME, name=name)


def _with_checksums(manifest: dict[str, Any]) -> dict[str, Any]:
    # Per-field checksums of the settings: a reader names any field edited by hand (k, vocab_rows, ...).
    return {**manifest, "config_checksums": config_checksums(manifest["config"])}


def _resolve_teacher(
    teacher: Any, tokenizer: Any, dtype: Any, quantization: str, device: Any, name: str | None
) -> tuple[ModelTeacher | ServerTeacher, Any, dict[str, Any]]:
    """The teacher wrapped as a frozen :class:`ModelTeacher` (or a server), its tokenizer, and its manifest record."""
    if isinstance(teacher, ServerTeacher):
        tokenizer = tokenizer if tokenizer is not None else teacher.tokenizer
        if tokenizer is None:
            raise ValueError("build_cache needs tokenizer=... (the student's) to cache from a ServerTeacher.")
        teacher.use_tokenizer(tokenizer)  # before any row is sent: a mismatch would cache wrong ids
        record = teacher.describe()
        if name:
            record["name"] = name
        return teacher, tokenizer, record
    if isinstance(teacher, (str, os.PathLike)):
        name = name or str(teacher)
        if tokenizer is None:
            tokenizer = load_tokenizer(str(teacher))
        teacher = load_causal_lm(str(teacher), dtype=resolve_dtype(dtype), quantization=quantization, device=device)
    if tokenizer is None:
        raise ValueError("build_cache needs the teacher's tokenizer when the teacher is given as a model object.")
    if isinstance(teacher, ModelTeacher):
        wrapped = teacher
    elif isinstance(teacher, nn.Module):
        wrapped = ModelTeacher(teacher, device=device)
    else:
        raise TypeError(
            f"teacher must be a path, a causal LM, a ModelTeacher or a ServerTeacher; got {type(teacher).__name__}."
        )
    config = getattr(wrapped.model, "config", None)
    record = {
        "name": name or getattr(config, "_name_or_path", "") or type(wrapped.model).__name__,
        "revision": getattr(config, "_commit_hash", None),
        "dtype": str(next(wrapped.model.parameters()).dtype).removeprefix("torch."),
        "quantization": _quantization_of(wrapped.model, quantization),
        "vocab_rows": wrapped.vocab_rows,
    }
    return wrapped, tokenizer, record


def _codec_available(name: Any) -> bool:
    try:
        return isinstance(name, str) and pa.Codec.is_available(name)
    except ValueError:  # a name pyarrow does not know at all
        return False


def _quantization_of(model: nn.Module, requested: str) -> str:
    """``"none"``, ``"4bit"`` or ``"8bit"``: what was asked for, or what a model passed in already holds."""
    if requested != "none" or not is_quantized(model):
        return requested
    return "8bit" if getattr(model, "is_loaded_in_8bit", False) else "4bit"


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group row numbers, longest first, into batches of at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    batches: list[list[int]] = []
    for row in order:
        # Rows come longest first, so the batch's first row sets its padded length.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


@torch.no_grad()
def _shard_table(
    teacher: ModelTeacher | ServerTeacher,
    rows: dict[str, list[Any]],
    spans: list[list[int]],
    encoding: Encoding,
    vocab_size: int,
    pad_token_id: int,
    batch_tokens: int,
    first_row: int,
    on_tokens: Any,
    seed: int = 0,
) -> pa.Table:
    """The parquet table of one shard: every row's top-k (or sampled) targets at its loss positions, in row order."""
    input_ids = rows["input_ids"]
    encoded: list[Any] = [None] * len(input_ids)
    device = teacher.device if isinstance(teacher, ModelTeacher) else torch.device("cpu")
    for batch in _batches([len(ids) for ids in input_ids], batch_tokens):
        length = len(input_ids[batch[0]])
        ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        flat_positions = []
        for b, row in enumerate(batch):
            ids[b, : len(input_ids[row])] = torch.tensor(input_ids[row])
            mask[b, : len(input_ids[row])] = 1
            flat_positions.append(torch.from_numpy(spans_to_positions(spans[row])) + b * length)
        answer = teacher.targets(ids.to(device), mask.to(device))
        positions = torch.cat(flat_positions).to(device)
        if isinstance(answer, SparseTargets):  # a server: its top-k at every position, keep the loss positions
            top = answer.flatten().take(positions)
            top_ids, top_logprobs, tail = (t.cpu().numpy() for t in (top.topk_ids, top.topk_logprobs, top.tail_mass))
        else:
            head = answer
            hidden = head.hidden.reshape(len(batch) * length, -1)[positions]
            if not encoding.sampled:
                top = topk_from_hidden(hidden, head, encoding.k, vocab_size)
                top_ids, top_logprobs, tail = (t.cpu().numpy() for t in top)
        start = 0
        for b, row in enumerate(batch):
            count = len(flat_positions[b])
            part = slice(start, start + count)
            if encoding.sampled:  # one generator per row: its samples do not depend on the batching
                generator = row_generator(row_key(input_ids[row]), seed, hidden.device)
                row_targets = sampled_from_hidden(hidden[part], head, encoding.k, vocab_size, generator)
                encoded[row] = encoding.encode(*(t.cpu().numpy() for t in row_targets))
            else:
                encoded[row] = encoding.encode(top_ids[part], top_logprobs[part], tail[part])
            start += count
        on_tokens(start)
    columns = {
        "key": [row_key(ids) for ids in input_ids],
        "index": list(range(first_row, first_row + len(input_ids))),
        "num_tokens": [len(ids) for ids in input_ids],
        "spans": spans,
        "ids": [e.ids for e in encoded],
        "logprobs": [e.logprobs for e in encoded],
        "mass": [e.mass for e in encoded],
    }
    return pa.table(columns, schema=SHARD_SCHEMA)


def check_cache_folder(out_dir: str | os.PathLike, name: str = "out_dir") -> dict[str, Any] | None:
    """Check, before any work, that ``out_dir`` can hold a cache: writable, and empty or a cache already.

    Args:
        out_dir: the cache folder (created if missing).
        name: the argument's name, for messages (``"--out"`` on the command line).

    Returns:
        The manifest of the (finished or unfinished) cache already there, or ``None``.

    Raises:
        InputError: the folder cannot be written, or holds other files (listed; nothing is deleted).
        CacheError: its ``manifest.json`` is not a cache manifest (not JSON, another format).
    """
    return _cache_folder(out_dir, name).check(read_manifest)


def _check_early_settings(folder: Path, manifest: dict[str, Any] | None, settings: dict[str, Any]) -> None:
    """Refuse, before the teacher loads, a cache folder built with other settings than the ones known already."""
    if manifest is None:
        return
    differing = [key for key in _EARLY_SETTINGS if manifest["config"].get(key) != settings[key]]
    if manifest["config"].get("encoding", {}).get("name") != settings["encoding"]:
        differing.append("encoding")
    differing.sort()
    if differing:
        found = ", ".join(f"{key}: {manifest['config'].get(key)!r} there, {settings.get(key)!r} now"
                          for key in differing if key != "encoding")  # fmt: skip
        raise CacheMismatchError(
            f"{folder} already holds a cache built with other settings (differing: {', '.join(differing)}; "
            f"{found}). Write to another folder, or delete this one to rebuild."
        )


def _check_same_config(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest already in ``folder`` (``None`` if none), refused unless it was built with ``config``."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest["config"] != config:
        differing = sorted(key for key in config.keys() | manifest["config"].keys()
                           if config.get(key) != manifest["config"].get(key))  # fmt: skip
        raise CacheMismatchError(
            f"{folder} already holds a cache built with other settings (differing: {', '.join(differing)}). "
            "Write to another folder, or delete this one to rebuild."
        )
    return manifest


def _check_arguments(
    teacher: Any, targets: str, encoding: str, compression: str, dtype: Any, **numbers: Any
) -> tuple[Any, ...]:
    """Refuse bad arguments before a teacher is loaded or anything is written; the numbers as ints, in order."""
    if targets not in ("top_k", "sampled"):
        raise InputError(f"targets must be 'top_k' or 'sampled'; got {targets!r}.")
    if encoding not in ENCODINGS:
        raise InputError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}.")
    minimums = {"top_k": 1, "max_length": 2, "rows_per_shard": 1, "batch_tokens": 1, "seed": None, "vocab_size": 1}
    numbers = {
        key: value if value is None and key == "vocab_size" else check_int(value, key, minimum=minimums[key])
        for key, value in numbers.items()
    }
    if compression != "none" and not _codec_available(compression):
        raise InputError(f"compression={compression!r} is not a parquet codec here; use 'zstd', 'snappy' or 'none'.")
    if isinstance(teacher, (str, os.PathLike)):
        resolve_dtype(dtype)  # an unknown name fails here, not after the teacher's tokenizer loads
        check_model_source(teacher, "teacher")
    if isinstance(teacher, ServerTeacher):
        if targets == "sampled":
            raise ValueError(
                "Sampled targets need the teacher's full distribution, and a server returns only its top-k "
                "log-probs: cache from a ServerTeacher with targets='top_k', or from the model in-process."
            )
        if teacher.top_k != numbers["top_k"]:
            raise ValueError(
                f"top_k={numbers['top_k']} but the ServerTeacher asks for {teacher.top_k}: make them equal."
            )
    return tuple(numbers.values())


def _dataset_record(dataset: Any, rows: Any, all_spans: list[list[int]]) -> dict[str, Any]:
    """The manifest's ``config.dataset``: counts and a sha256 over every row's key and loss spans."""
    content = hashlib.sha256()
    for ids, spans in zip(rows["input_ids"], all_spans, strict=True):
        content.update(row_key(ids).encode() + np.asarray(spans, dtype="<i8").tobytes() + b";")
    return {
        "num_rows": len(rows),
        "num_loss_tokens": int(sum(len(spans_to_positions(s)) for s in all_spans)),
        "rows_sha256": content.hexdigest(),
        "source_fingerprint": getattr(dataset, "_fingerprint", None),
    }


def build_cache(
    teacher: nn.Module | ModelTeacher | ServerTeacher | str | os.PathLike,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    top_k: int = 64,
    encoding: str = "compact",
    targets: str = "top_k",
    seed: int = 0,
    max_length: int = 1024,
    completion_only_loss: bool = True,
    vocab_size: int | None = None,
    rows_per_shard: int = 1024,
    batch_tokens: int = 16384,
    dtype: str | torch.dtype | None = "auto",
    quantization: str = "none",
    device: str | torch.device | None = None,
    teacher_name: str | None = None,
    compression: str = "zstd",
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Run a teacher over a dataset once and store its top-k targets at every loss token.

    Rows are tokenized as the trainer does (:func:`distill.data.prepare_dataset` with the same
    ``max_length`` and ``completion_only_loss``), so :class:`distill.teachers.CachedTeacher` finds
    every training row. Running again with the same arguments resumes an interrupted build.

    Args:
        teacher: a causal LM, a :class:`~distill.teachers.ModelTeacher`, a path / hub name (loaded
            with ``dtype``, ``quantization``, ``device``), or a :class:`~distill.teachers.ServerTeacher`
            (a vLLM server's top-k, ``targets="top_k"`` only; its ``top_k`` must equal ``top_k``). A server
            that fails mid-build raises :class:`~distill.teachers.server.ServerError` after its retries;
            the shards written so far stay, and the same call resumes after them.
        dataset: a ``datasets.Dataset`` of any layout :func:`~distill.data.prepare_dataset` accepts.
        out_dir: the cache folder (created; an unfinished build of the same cache there is resumed).
        tokenizer: the teacher's (= the student's) tokenizer; loaded from ``teacher`` when it is a path.
        top_k: entries per token.
        encoding: ``"compact"`` or ``"fp16"`` (see :mod:`distill.formats.encoding`).
        targets: ``"top_k"`` (the ``top_k`` most likely tokens and the tail mass) or ``"sampled"``
            (``top_k`` tokens priority-sampled per position with unbiased weights, see
            :mod:`distill.formats.sampling`; trains the forward KL only, without the top-k's bias).
        seed: the sampled targets' seed (each row's draws are seeded by it and the row's key).
        max_length, completion_only_loss: as in ``DistillConfig``; must match the training run.
        vocab_size: softmax over the first ``vocab_size`` head rows; default ``len(tokenizer)`` (the
            trainer's shared vocabulary; padded head rows are left out).
        rows_per_shard: dataset rows per shard (the unit of resumption).
        batch_tokens: padded tokens per teacher forward; rows are batched longest first within a shard.
        dtype, quantization, device: how to load a teacher given as a path.
        teacher_name: recorded in the manifest (default: the path or the model's ``name_or_path``).
        compression: parquet compression (``"zstd"``, ``"none"``, ...).
        progress: show a tqdm bar (tokens/s, ETA; rank 0's shards only when several processes build).
        distributed: ``None`` (default): when launched by ``accelerate launch`` / ``torchrun`` (or with
            ``torch.distributed`` initialized), every rank builds its share of the shards (its own device:
            ``device`` defaults to accelerate's for the rank), rank 0 writes the manifest, and every rank
            returns it; the cache is byte-identical to a one-process build. ``False``: this process builds
            alone (e.g. when called on one rank of a training job).

    Returns:
        The final manifest (also written to ``out_dir/manifest.json``).

    Raises:
        CacheMismatchError: ``out_dir`` holds a cache built with other settings.
        distill.shards.RankFailedError: another rank failed (every rank raises; the finished shards stay).
    """
    # Every argument is checked, and the folder too, before a teacher is loaded or anything is written.
    top_k, max_length, rows_per_shard, batch_tokens, seed, vocab_size = _check_arguments(
        teacher, targets, encoding, compression, dtype, top_k=top_k, max_length=max_length,
        rows_per_shard=rows_per_shard, batch_tokens=batch_tokens, seed=seed, vocab_size=vocab_size,
    )  # fmt: skip
    ranks = Ranks.join(distributed)
    folder = _cache_folder(out_dir)
    early = {"k": top_k, "targets": targets, "seed": seed if targets == "sampled" else None, "max_length": max_length,
             "completion_only_loss": completion_only_loss, "rows_per_shard": rows_per_shard,
             "batch_tokens": batch_tokens, "compression": compression, "encoding": encoding}  # fmt: skip
    # Rank 0 checks and every rank raises its error: the ranks never disagree about the folder.
    ranks.on_main(lambda: _check_early_settings(folder.path, folder.check(read_manifest), early))
    if device is None and ranks.world > 1 and not isinstance(teacher, (ServerTeacher, ModelTeacher)):
        device = rank_device()  # this rank's GPU (cuda:LOCAL_RANK), or the CPU
    model_teacher, tokenizer, teacher_record = _resolve_teacher(
        teacher, tokenizer, dtype, quantization, device, teacher_name
    )
    vocab_size = vocab_size or min(len(tokenizer), model_teacher.vocab_rows)
    with ranks.main_first():  # rank 0 fills the datasets cache of a dataset on disk; the others reuse it
        rows, report = prepare_dataset(
            dataset, tokenizer, max_length=max_length, completion_only_loss=completion_only_loss
        )
    plan = _ShardPlan(rows, [loss_spans(labels) for labels in rows["labels"]], rows_per_shard)
    code = Encoding(encoding, top_k, model_teacher.vocab_rows, sampled=targets == "sampled")
    dataset_record = _dataset_record(dataset, rows, plan.all_spans)
    start = _start_manifest(early, teacher_record, tokenizer, code, vocab_size, dataset_record, plan.num_shards)
    config = start["config"]
    existing = ranks.on_main(lambda: _check_same_config(folder.path, config))
    mine = folder.begin(ranks, plan.num_shards, _with_checksums(start) if existing is None else None)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = progress_bar(
        ranks, config["dataset"]["num_loss_tokens"], sum(plan.tokens(shard) for shard in mine),
        "Caching teacher top-k", progress, unit="tok", unit_scale=True,
    )  # fmt: skip
    failure = None
    try:
        with bar:
            for shard in mine:
                part = plan.rows_of(shard)
                table = _shard_table(
                    model_teacher, rows[part], plan.all_spans[part], code, vocab_size, pad_token_id, batch_tokens,
                    part.start, bar.update, seed,
                )  # fmt: skip
                record = {"first_row": part.start, "rows": part.stop - part.start, "tokens": plan.tokens(shard)}
                folder.write_shard(shard, _parquet_writer(table, compression), record)
    except Exception as error:  # the other ranks learn of it, and every rank stops here
        failure = error
    ranks.agree(failure)

    return folder.finish(
        ranks, plan.num_shards, lambda shards: _finished_manifest(start, shards, code, report.num_truncated)
    )


def _start_manifest(
    early: dict[str, Any],
    teacher: dict[str, Any],
    tokenizer: Any,
    code: Encoding,
    vocab_size: int,
    dataset: dict[str, Any],
    num_shards: int,
) -> dict[str, Any]:
    """The manifest of an unfinished build: the format, every setting the cache depends on, no shards yet."""
    config = {
        **{key: early[key] for key in _EARLY_SETTINGS},  # k, targets, seed, max_length, ...
        "teacher": teacher,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
        "encoding": code.describe(),
        "vocab_size": vocab_size,
        "dataset": dataset,
        "row_group_rows": ROW_GROUP_ROWS,
    }
    return {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, "num_shards": num_shards,
            "config": config, "shards": []}  # fmt: skip


@dataclass(frozen=True)
class _ShardPlan:
    """The prepared rows cut into shards: shard ``s`` holds rows ``[s * rows_per_shard, (s + 1) * rows_per_shard)``.

    Attributes:
        rows: the prepared dataset (``input_ids``, ``labels``).
        all_spans: each row's loss spans.
        rows_per_shard: rows per shard (the last may hold fewer).
    """

    rows: Any
    all_spans: list[list[int]]
    rows_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.rows) // self.rows_per_shard)

    def rows_of(self, shard: int) -> slice:
        """The shard's rows of the prepared dataset."""
        return slice(shard * self.rows_per_shard, min((shard + 1) * self.rows_per_shard, len(self.rows)))

    def tokens(self, shard: int) -> int:
        """The shard's loss tokens."""
        return sum(len(spans_to_positions(s)) for s in self.all_spans[self.rows_of(shard)])


def _parquet_writer(table: pa.Table, compression: str) -> Any:
    """A ``write(temp_path)`` for :meth:`ShardFolder.write_shard`: the shard's table as parquet."""
    return lambda temp: pq.write_table(table, temp, compression=compression, row_group_size=ROW_GROUP_ROWS)


def _finished_manifest(start: dict[str, Any], shards: list[dict[str, Any]], code: Encoding, truncated: int) -> dict:
    """The complete manifest: the start record with every shard's record (in shard order) and the totals."""
    total_bytes = sum(shard["bytes"] for shard in shards)
    total_tokens = sum(shard["tokens"] for shard in shards)
    totals = {
        "rows": start["config"]["dataset"]["num_rows"],
        "tokens": total_tokens,
        "file_bytes": total_bytes,
        "file_bytes_per_token": round(total_bytes / max(total_tokens, 1), 3),
        "encoded_bytes_per_token": code.bytes_per_token,
        "truncated_rows": truncated,
    }
    return _with_checksums({**start, "complete": True, "shards": shards, "totals": totals})

"""Building a top-k cache: run a teacher once over a dataset, store its targets (format: ``docs/offline.md``).

Crash safety: shard ``s`` always holds rows ``[s * rows_per_shard, (s + 1) * rows_per_shard)`` of the
prepared dataset, whatever happened before, so a restarted build recomputes exactly the missing
shards. Every file (shard or manifest) is written under a temporary name, fsynced, then renamed
over its final name with ``os.replace`` (atomic on POSIX), and the folder is fsynced: at any
instant, even after SIGKILL or a power cut, each shard is either absent or whole, and the manifest
lists only whole shards with their sha256. Nothing in the files depends on time or on how often
the build was interrupted, so a resumed cache is byte-identical to an uninterrupted one.

Nothing else is touched: the temporary files carry a suffix of their own (``.distill-partial``) and only
those of this cache's own file names are removed, and a folder holding anything but a cache (or an
unfinished one, to resume) is refused before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from distill.checks import InputError, check_int, check_writable_folder
from distill.data import prepare_dataset
from distill.formats.encoding import ENCODINGS, Encoding
from distill.formats.reader import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheMismatchError,
    config_checksums,
    file_sha256,
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
from distill.teachers.cached import sampled_from_hidden, topk_from_hidden
from distill.teachers.model import ModelTeacher
from distill.teachers.server import ServerTeacher

__all__ = ["SHARD_SCHEMA", "build_cache", "check_cache_folder"]

TEMP_SUFFIX = ".distill-partial"
# The only names a cache folder holds: the manifest, the shards, and their temporary files (this
# version's suffix, and the ".tmp" of earlier versions, removed when a build resumes).
_FINAL_NAME = r"(manifest\.json|shard-\d{5}\.parquet)"
_TEMP_FILE = re.compile(_FINAL_NAME + r"(\.distill-partial|\.tmp)")
_CACHE_FILE = re.compile(_FINAL_NAME + r"(\.distill-partial|\.tmp)?")
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


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(temp: Path, final: Path) -> None:
    with open(temp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temp, final)
    _fsync_dir(final.parent)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    # Per-field checksums of the settings: a reader names any field edited by hand (k, vocab_rows, ...).
    manifest["config_checksums"] = config_checksums(manifest["config"])
    temp = folder / (MANIFEST_NAME + TEMP_SUFFIX)
    temp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _replace_atomically(temp, folder / MANIFEST_NAME)


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
    folder = check_writable_folder(out_dir, name)
    manifest = read_manifest(folder)
    foreign = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in folder.iterdir()
        if entry.is_dir()
        or not _CACHE_FILE.fullmatch(entry.name)
        # Without a manifest only temporary files can be ours: a build writes the manifest before any shard.
        or (manifest is None and not _TEMP_FILE.fullmatch(entry.name))
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"{name} {os.fspath(out_dir)!r} is not empty and is not a top-k cache: it holds {shown}. Nothing was "
            "written or deleted. Give an empty or new folder, or the folder of a cache to resume."
        )
    return manifest


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


def _completed_shards(folder: Path, manifest: dict[str, Any] | None, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards a previous (interrupted) build of the same cache finished, checked against their sha256."""
    if manifest is None:
        return []
    if manifest["config"] != config:
        differing = sorted(key for key in config.keys() | manifest["config"].keys()
                           if config.get(key) != manifest["config"].get(key))  # fmt: skip
        raise CacheMismatchError(
            f"{folder} already holds a cache built with other settings (differing: {', '.join(differing)}). "
            "Write to another folder, or delete this one to rebuild."
        )
    done = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.exists() or path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
            break  # recompute from here: shards are deterministic, so the result is the same
        done.append(shard)
    return done


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
        progress: show a tqdm bar (tokens/s, ETA).

    Returns:
        The final manifest (also written to ``out_dir/manifest.json``).

    Raises:
        CacheMismatchError: ``out_dir`` holds a cache built with other settings.
    """
    # Every argument is checked, and the folder too, before a teacher is loaded or anything is written.
    if targets not in ("top_k", "sampled"):
        raise InputError(f"targets must be 'top_k' or 'sampled'; got {targets!r}.")
    if encoding not in ENCODINGS:
        raise InputError(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}.")
    top_k = check_int(top_k, "top_k")
    max_length = check_int(max_length, "max_length", minimum=2)
    rows_per_shard = check_int(rows_per_shard, "rows_per_shard")
    batch_tokens = check_int(batch_tokens, "batch_tokens")
    seed = check_int(seed, "seed", minimum=None)
    if vocab_size is not None:
        vocab_size = check_int(vocab_size, "vocab_size")
    if compression != "none" and not _codec_available(compression):
        raise InputError(f"compression={compression!r} is not a parquet codec here; use 'zstd', 'snappy' or 'none'.")
    if isinstance(teacher, (str, os.PathLike)):
        resolve_dtype(dtype)  # an unknown name fails here, not after the teacher's tokenizer loads
        check_model_source(teacher, "teacher")
    folder = Path(out_dir)
    existing = check_cache_folder(folder)
    early = {"k": top_k, "targets": targets, "seed": seed if targets == "sampled" else None, "max_length": max_length,
             "completion_only_loss": completion_only_loss, "rows_per_shard": rows_per_shard,
             "batch_tokens": batch_tokens, "compression": compression, "encoding": encoding}  # fmt: skip
    _check_early_settings(folder, existing, early)
    if isinstance(teacher, ServerTeacher):
        if targets == "sampled":
            raise ValueError(
                "Sampled targets need the teacher's full distribution, and a server returns only its top-k "
                "log-probs: cache from a ServerTeacher with targets='top_k', or from the model in-process."
            )
        if teacher.top_k != top_k:
            raise ValueError(f"top_k={top_k} but the ServerTeacher asks for {teacher.top_k}: make them equal.")
    model_teacher, tokenizer, teacher_record = _resolve_teacher(
        teacher, tokenizer, dtype, quantization, device, teacher_name
    )
    vocab_size = vocab_size or min(len(tokenizer), model_teacher.vocab_rows)
    rows, report = prepare_dataset(
        dataset, tokenizer, max_length=max_length, completion_only_loss=completion_only_loss
    )
    all_spans = [loss_spans(labels) for labels in rows["labels"]]
    content = hashlib.sha256()
    for ids, spans in zip(rows["input_ids"], all_spans, strict=True):
        content.update(row_key(ids).encode() + np.asarray(spans, dtype="<i8").tobytes() + b";")

    code = Encoding(encoding, top_k, model_teacher.vocab_rows, sampled=targets == "sampled")
    config = {
        "teacher": teacher_record,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
        "k": top_k,
        "targets": targets,
        "seed": seed if targets == "sampled" else None,
        "encoding": code.describe(),
        "vocab_size": vocab_size,
        "max_length": max_length,
        "completion_only_loss": completion_only_loss,
        "dataset": {
            "num_rows": len(rows),
            "num_loss_tokens": int(sum(len(spans_to_positions(s)) for s in all_spans)),
            "rows_sha256": content.hexdigest(),
            "source_fingerprint": getattr(dataset, "_fingerprint", None),
        },
        "rows_per_shard": rows_per_shard,
        "row_group_rows": ROW_GROUP_ROWS,
        "batch_tokens": batch_tokens,
        "compression": compression,
    }
    for leftover in folder.iterdir():  # this cache's own temporary files, from a build killed mid-write
        if _TEMP_FILE.fullmatch(leftover.name):
            leftover.unlink()
    num_shards = -(-len(rows) // rows_per_shard)
    shards = _completed_shards(folder, read_manifest(folder), config)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, "num_shards": num_shards,
                "config": config, "shards": shards}  # fmt: skip
    _write_manifest(folder, manifest)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(
        total=config["dataset"]["num_loss_tokens"],
        initial=sum(shard["tokens"] for shard in shards),
        unit="tok",
        unit_scale=True,
        desc="Caching teacher top-k",
        disable=not progress,
    )
    with bar:
        for shard_number in range(len(shards), num_shards):
            first = shard_number * rows_per_shard
            last = min(first + rows_per_shard, len(rows))
            table = _shard_table(
                model_teacher, rows[first:last], all_spans[first:last], code, vocab_size, pad_token_id,
                batch_tokens, first, bar.update, seed,
            )  # fmt: skip
            name = f"shard-{shard_number:05d}.parquet"
            temp = folder / (name + TEMP_SUFFIX)
            pq.write_table(table, temp, compression=compression, row_group_size=ROW_GROUP_ROWS)
            _replace_atomically(temp, folder / name)
            tokens = sum(len(spans_to_positions(s)) for s in all_spans[first:last])
            shards.append(
                {"file": name, "first_row": first, "rows": last - first, "tokens": tokens,
                 "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
            )  # fmt: skip
            _write_manifest(folder, manifest)
    total_bytes = sum(shard["bytes"] for shard in shards)
    total_tokens = sum(shard["tokens"] for shard in shards)
    manifest["complete"] = True
    manifest["totals"] = {
        "rows": len(rows),
        "tokens": total_tokens,
        "file_bytes": total_bytes,
        "file_bytes_per_token": round(total_bytes / max(total_tokens, 1), 3),
        "encoded_bytes_per_token": code.bytes_per_token,
        "truncated_rows": report.num_truncated,
    }
    _write_manifest(folder, manifest)
    return manifest

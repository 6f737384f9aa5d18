"""Checkpoints a resume can trust: marked complete when whole, checked before use, compared with the run's settings.

``transformers.Trainer`` writes ``checkpoint-N/`` file by file. A process killed in the middle (SIGKILL,
OOM killer, a node lost) leaves a partial folder that is the newest, and every
``train(resume_from_checkpoint=True)`` then fails in the loader until it is deleted by hand. Here:

- when a save has finished on every process, the main process writes :data:`MARKER_NAME` into the folder
  (atomically: temporary name, fsync, rename): every file's size and the run's settings;
- a resume takes the newest checkpoint that is complete (marker present and every file its recorded
  size; for folders written without a marker, ``trainer_state.json`` present and no file cut short),
  and says which newer folders it skipped and why;
- a resume under other training settings (loss, beta, temperature, learning rate, ...) is refused with
  the list of changes, unless ``allow_resume_changes=True``, which logs them instead.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from distill.checks import InputError
from distill.models.files import IncompleteFilesError, damaged_files

__all__ = [
    "MARKER_NAME",
    "checkpoint_problem",
    "check_resume_settings",
    "remove_incomplete",
    "resolve_resume",
    "run_settings",
    "write_marker",
]

logger = logging.getLogger(__name__)

MARKER_NAME = "distill_checkpoint.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_STATE_NAME = "trainer_state.json"  # written last by transformers' _save_checkpoint
# DistillConfig fields that change how the run computes, not what it computes (or its bookkeeping).
_NOT_SETTINGS = frozenset(
    {
        "teacher_device",
        "teacher_prefetch",
        "teacher_sharding",
        "save_on_sigterm",
        "dataset_num_proc",
        "allow_resume_changes",
        "loss_chunk_size",
        "loss_implementation",
        # How the models are found and loaded (attention kernel, remote code): not what they compute.
        "model_init_kwargs",
        "teacher_model_init_kwargs",
        "trust_remote_code",
        "teacher_model_name_or_path",
    }
)
# TrainingArguments fields that change the optimisation a resumed run continues.
_TRAINING_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "bf16",
    "fp16",
)


def _plain(value: Any) -> Any:
    """A JSON-comparable form of a setting (enums by value, containers recursively, others by ``repr``)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return repr(value)


def run_settings(args: Any) -> dict[str, Any]:
    """The settings a resumed run must share with the checkpoint: every distillation field (those a
    ``DistillConfig`` adds to ``TrainingArguments``, so new ones are covered too) but the placement ones,
    plus the optimiser's, the schedule's, the batch's and the seed."""
    inherited = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    names = [spec.name for spec in dataclasses.fields(args) if spec.name not in inherited | _NOT_SETTINGS]
    names += [name for name in _TRAINING_SETTINGS if hasattr(args, name)]
    return {name: _plain(getattr(args, name)) for name in names}


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }


def write_marker(folder: str | os.PathLike, args: Any) -> None:
    """Mark a checkpoint folder complete: every file's size and the run's settings, written atomically.

    Call it once every process has finished writing into ``folder`` (main process only).
    """
    folder = Path(folder)
    record = {"complete": True, "files": _file_sizes(folder), "settings": run_settings(args)}
    temp = folder / f".{MARKER_NAME}.distill-partial"
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, folder / MARKER_NAME)
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)  # make the rename durable
    finally:
        os.close(descriptor)


def _marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes a checkpoint folder unusable (a save that did not finish, a file cut short), or ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    record = _marker(folder)
    if record is not None:
        if not record.get("complete") or not isinstance(record.get("files"), dict):
            return f"its {MARKER_NAME} is damaged"
        for name, size in record["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} has {path.stat().st_size:,} bytes, {size:,} when it was saved"
    elif not (folder / _STATE_NAME).is_file():
        return f"it has no {_STATE_NAME}, the file a finished save writes last"
    damaged = damaged_files(folder)
    if damaged:
        return "; ".join(f"{path} is cut short ({problem})" for path, problem in damaged)
    return None


def remove_incomplete(folder: str | os.PathLike) -> None:
    """Delete ``folder`` if it is a checkpoint a killed save left unfinished, so a new save does not mix with it."""
    folder = Path(folder)
    if folder.is_dir() and _CHECKPOINT.fullmatch(folder.name) and checkpoint_problem(folder) is not None:
        logger.warning("Removing the unfinished checkpoint %s before saving this step again.", folder)
        shutil.rmtree(folder)


def resolve_resume(output_dir: str | os.PathLike, resume: str | bool | None) -> str | None:
    """The checkpoint folder to resume from, checked whole.

    Args:
        output_dir: the run's ``output_dir``.
        resume: as ``Trainer.train``'s ``resume_from_checkpoint``: a folder, ``True`` (the newest complete
            one in ``output_dir``), or ``None`` / ``False``.

    Returns:
        A folder, or ``None`` (no resume).

    Raises:
        IncompleteFilesError: the folder given is incomplete (the message names the file).
        ValueError: ``True`` but no complete checkpoint (the incomplete ones are listed).
    """
    if resume is None or resume is False:
        return None
    if resume is not True:
        problem = checkpoint_problem(resume)
        if problem == "no such folder":
            raise InputError(f"resume_from_checkpoint={os.fspath(resume)!r}: no such folder.")
        if problem is not None:
            raise IncompleteFilesError(
                f"The checkpoint {os.fspath(resume)} is incomplete: {problem}. Its save did not finish (a process "
                "killed while writing it?). Resume from an earlier checkpoint, or with resume_from_checkpoint=True, "
                "which takes the newest complete one."
            )
        return os.fspath(resume)
    found = []
    if Path(output_dir).is_dir():
        for entry in Path(output_dir).iterdir():
            match = _CHECKPOINT.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    skipped = []
    for _step, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                message = (
                    f"Resuming from {folder}, skipping newer incomplete checkpoint(s): "
                    + "; ".join(skipped)
                    + ". Their saves did not finish; they are left as they are (delete them when you like)."
                )
                logger.warning(message)
                warnings.warn(message, UserWarning, stacklevel=3)
            return str(folder)
        skipped.append(f"{folder} ({problem})")
    incomplete = f" The checkpoints there are incomplete: {'; '.join(skipped)}." if skipped else ""
    raise ValueError(f"No valid checkpoint found in output directory ({output_dir}).{incomplete}")


def check_resume_settings(folder: str | os.PathLike, args: Any) -> None:
    """Refuse (or, with ``args.allow_resume_changes``, log) a resume whose settings differ from the checkpoint's.

    Checkpoints without a marker (saved by another trainer or an older version) are not compared.

    Raises:
        InputError: settings changed; the message lists ``name: saved -> now`` and how to go on.
    """
    record = _marker(Path(folder)) or {}
    saved = record.get("settings")
    if not isinstance(saved, dict):
        return
    now = run_settings(args)
    # A field added to DistillConfig after the checkpoint was saved: that run had the field's default behaviour.
    defaults = {
        spec.name: spec.default for spec in dataclasses.fields(args) if spec.default is not dataclasses.MISSING
    }
    saved = {**{name: _plain(defaults[name]) for name in now if name not in saved and name in defaults}, **saved}
    changed = [
        f"{name}: {saved.get(name, '<unset>')!r} -> {now.get(name, '<unset>')!r}"
        for name in sorted(saved.keys() | now.keys())
        if saved.get(name) != now.get(name)
    ]
    if not changed:
        return
    listed = "; ".join(changed)
    if getattr(args, "allow_resume_changes", False):
        logger.warning("Resuming from %s with changed settings (allow_resume_changes=True): %s", folder, listed)
        return
    raise InputError(
        f"The checkpoint {os.fspath(folder)} was trained with other settings: {listed}. Resuming would continue "
        "the run silently under new ones. Use the saved settings, start a new output_dir, or set "
        "allow_resume_changes=True (--allow_resume_changes) to continue with the new ones."
    )

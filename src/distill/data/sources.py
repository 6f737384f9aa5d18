"""Where rows come from: the one place a ``--dataset`` name becomes a ``datasets.Dataset``.

Local paths are resolved before any hub lookup: a name that is (or can only be) a local file or folder
is read from disk or refused as missing, and only a name that is neither is passed to
``datasets.load_dataset`` as a hub id. Every refusal is a :class:`~distill.checks.InputError` whose one
line says what is wrong and what to pass instead (the CLI prints it with exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distill.checks import InputError, is_path_like

__all__ = ["FILE_BUILDERS", "load_rows"]

# File suffix -> the ``datasets`` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_TRUTHY = {"1", "ON", "YES", "TRUE"}
_ACCEPTED = f"a {'/'.join(FILE_BUILDERS)} file, a folder written by Dataset.save_to_disk(), or a hub dataset id"


def _read_file(path: Path, what: str) -> Any:
    import datasets

    if path.stat().st_size == 0:  # the json builder raises a bare StopIteration on an empty file
        raise InputError(f"{what} {os.fspath(path)!r} is empty: it holds no rows; pass the file that has them.")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a file reads in moments; its bar would be a second line beside an error
    try:
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise InputError(
            f"{what} {os.fspath(path)!r} cannot be read as {path.suffix} rows ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else 'no detail'}); fix the file or convert it."
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_hub(name: str, split: str, what: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as error:  # DatasetNotFoundError is a FileNotFoundError
        offline = any(
            os.environ.get(flag, "").upper() in _TRUTHY for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        )
        where = "not cached, and this machine is offline (HF_HUB_OFFLINE=1)" if offline else f"not found ({error})"
        raise InputError(
            f"{what} {name!r}: no such local file or folder (resolved to {Path(name).resolve()}); as a hub dataset "
            f"it is {where}. Pass {_ACCEPTED}."
        ) from None
    except ValueError as error:  # e.g. an unknown split
        raise InputError(f"{what} {name!r}: {str(error).splitlines()[0]}") from None


def load_rows(source: Any, split: str = "train", *, what: str = "--dataset") -> Any:
    """Rows from a local file or folder, a hub dataset id, or rows already in memory.

    Order: a ``datasets.Dataset``/``DatasetDict`` or a list of row dicts is used as is; an existing
    ``.json``/``.jsonl``/``.parquet``/``.csv`` file is read; a ``save_to_disk`` folder is loaded; another
    existing folder goes to ``datasets.load_dataset`` (a folder of data files); a name that can only be a
    path (``./x``, ``/x``, ``a/b/c``) or has a data-file suffix but does not exist is refused; anything else
    is a hub id.

    Args:
        source: a path, a hub id, a ``datasets.Dataset``, or a list of row dicts.
        split: the split of a hub dataset or ``DatasetDict`` (files and lists have one split).
        what: the argument's name, for messages (``"--dataset"``, ``"dataset"``).

    Returns:
        A ``datasets.Dataset``.

    Raises:
        InputError: missing file or folder, empty or unreadable file, unknown split, or a hub id that cannot
            be found (or is not cached while offline).
    """
    import datasets

    if isinstance(source, (list, tuple)):
        return datasets.Dataset.from_list(list(source))
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, what)
    if isinstance(source, datasets.Dataset):
        return source
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise InputError(f"{what} {name!r}: unknown file type {path.suffix or '(none)'!r}; pass {_ACCEPTED}.")
        return _read_file(path, what)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return datasets.load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return _pick_split(datasets.load_from_disk(str(path)), split, what)
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split)
    if is_path_like(name) or path.suffix in FILE_BUILDERS or not isinstance(source, str):
        raise InputError(f"{what} {name!r}: no such file or folder (resolved to {path.resolve()}); pass {_ACCEPTED}.")
    return _load_hub(name, split, what)


def _pick_split(loaded: Any, split: str, what: str) -> Any:
    if split not in loaded:
        raise InputError(f"{what}: no split {split!r}; it has {sorted(loaded)}. Pass one of those as --split.")
    return loaded[split]

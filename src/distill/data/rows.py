"""Rows from wherever a user keeps them: the one loader of the CLIs, the evaluation and the recipes.

A ``datasets.Dataset`` or a list of dicts passes through; a ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a
``save_to_disk`` folder is read locally; any other name is a hub dataset. A name that can only be a local path
and does not exist is refused with that path, never looked up on the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.checks import InputError, check_int, is_path_like

__all__ = ["FILE_BUILDERS", "load_rows", "split_heldout"]

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(
    source: Any,
    split: str = "train",
    subset: str | None = None,
    *,
    max_rows: int | None = None,
    what: str = "--dataset",
) -> Any:
    """A ``datasets.Dataset`` of rows.

    Args:
        source: a ``datasets.Dataset``, a list of row dicts, a json/jsonl/parquet/csv file, a folder written by
            ``save_to_disk`` (a saved ``DatasetDict`` gives its ``split``), or a hub dataset name.
        split: the split of a hub dataset or of a saved ``DatasetDict`` (a file is one split).
        subset: the configuration of a hub dataset (e.g. ``"main"`` of ``openai/gsm8k``).
        max_rows: keep only the first ``max_rows`` rows.
        what: how error messages name the source (e.g. ``--dataset``).

    Raises:
        InputError: a local path that does not exist, or a file of a type no builder reads.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        rows = source
    elif isinstance(source, (list, tuple)):
        rows = datasets.Dataset.from_list(list(source))
    elif subset is None:
        from distill.data.sources import load_rows as load_named  # local paths before the hub, one-line errors

        rows = load_named(str(source), split, what=what)
    else:
        rows = _load_named(str(source), split, subset)
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows")
        rows = rows.select(range(min(max_rows, len(rows))))
    return rows


def _load_named(name: str, split: str, subset: str | None) -> Any:
    import datasets

    path = Path(name).expanduser()
    if not path.exists() and (is_path_like(name) or path.suffix in FILE_BUILDERS):
        raise InputError(f"No dataset at {name!r}: no such file or folder (resolved to {path.resolve()}).")
    if path.is_file() and path.suffix not in FILE_BUILDERS:
        raise InputError(
            f"No dataset at {name!r}: unknown file type; give a {'/'.join(FILE_BUILDERS)} file or a folder written by "
            "Dataset.save_to_disk()."
        )
    if path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if path.is_file():
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    return datasets.load_dataset(name, subset, split=split)  # a hub name, or a folder of data files


def split_heldout(rows: Any, heldout_rows: int, max_train_rows: int | None, seed: int) -> tuple[Any, Any]:
    """``(train, heldout)``: ``heldout_rows`` rows set aside at random (seeded); train capped at ``max_train_rows``.

    Raises:
        InputError: ``heldout_rows`` would leave no training rows.
    """
    if heldout_rows >= len(rows):
        raise InputError(f"heldout_rows={heldout_rows} leaves no training rows out of {len(rows)}.")
    parts = rows.train_test_split(test_size=heldout_rows, seed=seed, shuffle=True)
    train = parts["train"]
    if max_train_rows is not None and max_train_rows < len(train):
        train = train.select(range(max_train_rows))
    return train, parts["test"]

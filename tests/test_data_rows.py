"""`distill.data.rows.load_rows`: the one row loader of the CLIs, the evaluation and the recipes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from distill.checks import InputError
from distill.data.rows import load_rows, split_heldout

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]


def test_rows_from_a_list_a_dataset_and_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    for source in (ROWS, datasets.Dataset.from_list(ROWS), jsonl, str(parquet)):
        assert load_rows(source).to_list() == ROWS, source
    assert load_rows(jsonl, max_rows=2).to_list() == ROWS[:2]


def test_a_saved_dataset_dict_gives_its_split(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])}
    ).save_to_disk(str(saved))
    assert load_rows(saved, split="test").to_list() == ROWS[4:]


def test_a_missing_path_or_an_unknown_file_is_refused_without_a_hub_lookup(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no such file or folder"):
        load_rows("./not/here")
    text = tmp_path / "rows.txt"
    text.write_text("x")
    with pytest.raises(InputError, match="unknown file type"):
        load_rows(text)


def test_split_heldout_is_seeded_and_capped() -> None:
    rows = datasets.Dataset.from_list(ROWS)
    train, heldout = split_heldout(rows, heldout_rows=2, max_train_rows=3, seed=0)
    assert (len(train), len(heldout)) == (3, 2)
    again_train, again_heldout = split_heldout(rows, heldout_rows=2, max_train_rows=3, seed=0)
    assert again_heldout.to_list() == heldout.to_list() and again_train.to_list() == train.to_list()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    with pytest.raises(InputError, match="leaves no training rows"):
        split_heldout(rows, heldout_rows=6, max_train_rows=None, seed=0)

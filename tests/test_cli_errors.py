"""Every ``distill`` error a new user meets first: one line that says what is wrong and the fix, exit code 2.

Local paths are resolved before any hub lookup (``distill.data.sources.load_rows`` for rows,
``distill.models.loading.check_model_source`` for models). The commands a user types are run as real
subprocesses (exit code, no traceback); the library entry point (``Trainer(model="./nope")``) in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from trainer_helpers import arithmetic_dataset, config

from distill import Trainer
from distill.cache import build_cache
from distill.checks import InputError
from distill.data.sources import load_rows
from distill.testing import arithmetic_rows, tiny_teacher_student

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
FIX_FOR_MODEL = "save_pretrained()"
FIX_FOR_ROWS = "Dataset.save_to_disk()"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer) -> Path:
    """A folder holding a saved tiny ``teacher/``, ``rows.jsonl`` (8 prompt/completion rows) and a k=4 ``cache/``."""
    folder = tmp_path_factory.mktemp("cli")
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    rows = arithmetic_rows(8, layout="prompt_completion")
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    build_cache(str(folder / "teacher"), load_rows(folder / "rows.jsonl"), folder / "cache", top_k=4, max_length=64,
                progress=False)  # fmt: skip
    return folder


def _distill(cwd: Path, *argv: str) -> tuple[int, str]:
    finished = subprocess.run(
        [sys.executable, "-m", "distill.cli", *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=180
    )
    return finished.returncode, finished.stderr


def _assert_refused(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# ---- as a user types them: real subprocesses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # A rerun with other settings names the differing setting and says where to write instead.
        (["cache", "--teacher", "teacher", "--dataset", "rows.jsonl", "--out", "cache", "--top-k", "8",
          "--max-length", "64"], ["other settings", "k: 4 there, 8 now", "another folder"]),
        (["cache", "--teacher", "teacher", "--dataset", "missing.jsonl", "--out", "new"],
         ["'missing.jsonl': no such file or folder", FIX_FOR_ROWS]),
        (["cache", "--teacher", "./nope", "--dataset", "rows.jsonl", "--out", "new"],
         ["'./nope' (--teacher): no such folder", FIX_FOR_MODEL]),
        (["generate", "--teacher", "./nope", "--dataset", "rows.jsonl", "--out", "new"],
         ["'./nope' (--teacher): no such folder", FIX_FOR_MODEL]),
        (["eval", "--student", "teacher", "--teacher", "./nope", "--dataset", "rows.jsonl", "--out", "new"],
         ["'./nope' (--teacher): no such folder", FIX_FOR_MODEL]),
    ],
    ids=["cache-rerun-other-settings", "cache-missing-jsonl", "cache-teacher", "generate-teacher", "eval-teacher"],
)  # fmt: skip
def test_cli_errors_are_one_line_with_the_fix_and_exit_2(workdir: Path, argv: list[str], needles: list[str]) -> None:
    code, err = _distill(workdir, *argv)
    _assert_refused(code, err, *needles)
    assert not (workdir / "new").exists()  # refused before the output folder is made
    assert "HFValidationError" not in err and "Hub" not in err


# ---- the same resolver, in-process (cheaper: no interpreter start per case) ---------------------------------------


@pytest.mark.parametrize(
    ("dataset", "needles"),
    [
        ("missing.jsonl", ["no such file or folder", FIX_FOR_ROWS]),
        ("data/missing", ["no such local file or folder", "offline", FIX_FOR_ROWS]),  # a hub id too: offline
        ("no-such-dataset", ["offline", FIX_FOR_ROWS]),
        ("empty.jsonl", ["is empty", "pass the file"]),
        ("broken.jsonl", ["cannot be read as .jsonl", "fix the file"]),
        ("notes.txt", ["unknown file type '.txt'", FIX_FOR_ROWS]),
    ],
)
def test_every_command_resolves_rows_locally_first(
    workdir: Path, dataset: str, needles: list[str], capsys, monkeypatch
) -> None:
    from distill.cli import main

    (workdir / "empty.jsonl").write_text("")
    (workdir / "broken.jsonl").write_text('{"prompt": "1+1=", "completion"\n')
    (workdir / "notes.txt").write_text("hello\n")
    monkeypatch.chdir(workdir)
    teacher = str(workdir / "teacher")
    for argv in (
        ["cache", "--teacher", teacher, "--dataset", dataset, "--out", "new"],
        ["generate", "--teacher", teacher, "--dataset", dataset, "--out", "new"],
        ["eval", "--student", teacher, "--teacher", teacher, "--dataset", dataset, "--out", "new"],
        ["prune", "--model", teacher, "--dataset", dataset, "--out", "new", "--target", "0.5"],
    ):
        code = main(argv)
        _assert_refused(code, capsys.readouterr().err, *needles)
        assert not (workdir / "new").exists(), argv


def test_rows_in_memory_and_local_files_load_without_the_hub(workdir: Path) -> None:
    rows = arithmetic_rows(3, layout="prompt_completion")
    assert len(load_rows(rows)) == 3
    assert load_rows(workdir / "rows.jsonl")[0] == arithmetic_rows(1, layout="prompt_completion")[0]
    saved = workdir / "saved"
    load_rows(rows).save_to_disk(saved)
    assert len(load_rows(str(saved))) == 3
    splits = datasets.DatasetDict(train=load_rows(rows))
    assert len(load_rows(splits, "train")) == 3
    with pytest.raises(InputError, match=r"no split 'test'.*\['train'\].*--split"):
        load_rows(splits, "test")


def test_trainer_with_a_missing_local_model_names_it_and_the_fix(tmp_path: Path, tokenizer) -> None:
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    for model, role in (("./nope", "model"), (student, "teacher")):
        kwargs = {"teacher": "./nope" if role == "teacher" else teacher, "processing_class": tokenizer}
        with pytest.raises(FileNotFoundError, match=rf"'\./nope' \({role}\): no such folder.*save_pretrained"):
            Trainer(model=model, args=config(tmp_path / "o"), train_dataset=arithmetic_dataset(4), **kwargs)

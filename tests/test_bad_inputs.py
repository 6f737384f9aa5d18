"""Hostile and mistaken inputs: refused before any model loads or file is touched, in one clear line, nothing lost.

Each group mirrors a class of issue 13's catalogue: folders that hold other files, numbers out of range
(negative, zero, NaN, infinite), malformed files, missing paths, flags spelled differently, settings a
teacher cannot serve. The command-line cases run in-process (``distill.cli.main``); a few run as real
subprocesses to check the exit code and that no traceback is printed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from trainer_helpers import arithmetic_dataset, config

from distill import DistillConfig, Trainer
from distill.cache import build_cache
from distill.checks import InputError, check_bool, check_float, check_int
from distill.cli import main as distill_main
from distill.data import DataError, prepare_dataset
from distill.evaluation.speed import resolve_price
from distill.formats.reader import CacheCorruptError, CacheError
from distill.generation.generate import generate_dataset
from distill.models import VocabularyMismatchError, load_causal_lm
from distill.models.files import IncompleteFilesError
from distill.models.loading import load_tokenizer
from distill.planning import load_prices, with_prices
from distill.teachers import CachedTeacher
from distill.testing import tiny_teacher_student, train_tiny_tokenizer

MISSING_MODEL = "./no/such/model"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``distill ARGV`` in this process; ``(exit code, stderr)``."""
    try:
        code = distill_main(argv)
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def _assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model or tokenizer is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    import transformers

    import distill.cache.writer as writer
    import distill.models.loading as loading

    for module, name in ((loading, "load_causal_lm"), (writer, "load_causal_lm"), (loading, "load_tokenizer")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tokenizer) -> Path:
    """A finished top-k cache (k = 4) of 12 arithmetic rows from a tiny random teacher."""
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp("cache")
    build_cache(teacher, arithmetic_dataset(12), folder, tokenizer=tokenizer, top_k=4, max_length=64,
                rows_per_shard=8, progress=False)  # fmt: skip
    return folder


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


# ---- data loss: only our own files are touched, and a folder of other files is refused --------------------------


def test_build_cache_refuses_a_folder_of_other_files_and_deletes_nothing(tmp_path: Path, tokenizer) -> None:
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    folder = tmp_path / "mine"
    folder.mkdir()
    keep = {"notes.tmp": b"my notes", "results.csv": b"a,b\n1,2\n", "draft.parquet.tmp": b"x"}
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    with pytest.raises(InputError, match=r"not a top-k cache.*notes\.tmp"):
        build_cache(teacher, arithmetic_dataset(8), folder, tokenizer=tokenizer, top_k=4, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == keep  # nothing deleted, nothing written
    # Only temporary files, none of them ours: still not a cache folder.
    only_tmp = tmp_path / "only_tmp"
    only_tmp.mkdir()
    (only_tmp / "x.tmp").write_text("keep me")
    with pytest.raises(InputError, match=r"x\.tmp"):
        build_cache(teacher, arithmetic_dataset(8), only_tmp, tokenizer=tokenizer, top_k=4, progress=False)
    assert (only_tmp / "x.tmp").read_text() == "keep me"


def test_resuming_a_cache_removes_only_its_own_temporary_files(small_cache: Path, tmp_path: Path, tokenizer) -> None:
    folder = _copy(small_cache, tmp_path / "cache")
    (folder / "shard-00001.parquet.distill-partial").write_bytes(b"half a shard")  # a build killed mid-write
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    build_cache(teacher, arithmetic_dataset(12), folder, tokenizer=tokenizer, top_k=4, max_length=64,
                rows_per_shard=8, progress=False)  # fmt: skip
    assert not (folder / "shard-00001.parquet.distill-partial").exists()
    (folder / "shard-00001.parquet.tmp.bak").write_text("a user's file in a cache folder")
    with pytest.raises(InputError, match=r"shard-00001\.parquet\.tmp\.bak"):
        build_cache(teacher, arithmetic_dataset(12), folder, tokenizer=tokenizer, top_k=4, max_length=64,
                    rows_per_shard=8, progress=False)  # fmt: skip
    assert (folder / "shard-00001.parquet.tmp.bak").exists()


def test_generate_refuses_a_folder_of_other_files_and_deletes_nothing(tmp_path: Path, tokenizer) -> None:
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".notes.tmp").write_text("hidden notes")
    (folder / "shard-00000.parquet").write_bytes(b"someone else's shard")
    with pytest.raises(InputError, match=r"not a `distill generate` output.*\.notes\.tmp"):
        generate_dataset(teacher, tokenizer, ["def f():"], folder, max_new_tokens=2)
    assert (folder / ".notes.tmp").read_text() == "hidden notes"
    assert (folder / "shard-00000.parquet").read_bytes() == b"someone else's shard"
    assert sorted(p.name for p in folder.iterdir()) == [".notes.tmp", "shard-00000.parquet"]


def test_cache_cli_refuses_a_foreign_or_unwritable_out_before_loading(tmp_path: Path, capsys, no_model_load) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    teacher = tmp_path / "teacher"  # exists, so the folder is what gets refused
    teacher.mkdir()
    base = ["cache", "--teacher", str(teacher), "--dataset", str(data)]
    _assert_one_line_refusal(*_cli([*base, "--out", str(foreign)], capsys), "--out", "thesis.tex")
    assert (foreign / "thesis.tex").read_text() == "years of work"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _assert_one_line_refusal(*_cli([*base, "--out", str(blocker / "cache")], capsys), "--out", "cannot be created")


# ---- numbers: refused while parsing or before any load, whatever the model path -----------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--num-completions", "0"],
        ["--max-new-tokens", "-1"],
        ["--temperature", "nan"],
        ["--temperature", "inf"],
        ["--temperature", "-0.5"],
        ["--batch-size", "0"],
        ["--batch-size", "two"],
        ["--top-p", "0"],
        ["--top-k", "-5"],
        ["--limit", "-3"],
        ["--prompts-per-shard", "0"],
        ["--filter-timeout", "nan"],
        ["--dtype", "bf17"],
        ["--device", "cuda:97"],
        ["--device", "banana"],
    ],
)
def test_generate_arguments_are_checked_before_any_load(tmp_path: Path, capsys, no_model_load, flags) -> None:
    argv = ["generate", "--teacher", MISSING_MODEL, "--dataset", "humaneval", "--out", str(tmp_path / "o"), *flags]
    code, err = _cli(argv, capsys)
    _assert_one_line_refusal(code, err, flags[0])
    assert "no such folder" not in err  # the bad number is reported, not the (also missing) model


@pytest.mark.parametrize(
    "flags",
    [
        ["--top-k", "0"],
        ["--top-k", "-3"],
        ["--rows-per-shard", "0"],
        ["--batch-tokens", "-1"],
        ["--max-length", "1"],
        ["--timeout", "nan"],
        ["--dtype", "int8"],
        ["--device", "cuda:97"],
    ],
)
def test_cache_arguments_are_checked_before_any_load(tmp_path: Path, capsys, no_model_load, flags) -> None:
    argv = ["cache", "--teacher", MISSING_MODEL, "--dataset", "x.jsonl", "--out", str(tmp_path / "o"), *flags]
    code, err = _cli(argv, capsys)
    _assert_one_line_refusal(code, err, flags[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--batch-size", "0"],
        ["--max-rows", "-3"],
        ["--k", "one"],
        ["--k", "0"],
        ["--samples", "0"],
        ["--temperature", "nan"],
        ["--price-per-hour", "nan"],
        ["--max-length", "0"],
        ["--dtype", "fp8"],
        ["--device", "cuda:97"],
    ],
)
def test_eval_arguments_are_checked_before_any_load(tmp_path: Path, capsys, no_model_load, flags) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    argv = ["eval", "--student", MISSING_MODEL, "--teacher", MISSING_MODEL, "--dataset", str(data),
            "--out", str(tmp_path / "o"), *flags]  # fmt: skip
    code, err = _cli(argv, capsys)
    _assert_one_line_refusal(code, err, flags[0])


def test_library_numbers_are_checked_before_any_load(tmp_path: Path, tokenizer, no_model_load) -> None:
    rows = arithmetic_dataset(4)
    for bad in (dict(rows_per_shard=0), dict(batch_tokens=-1), dict(top_k=0), dict(max_length=1), dict(top_k=2.5),
                dict(compression="lzma9"), dict(encoding="fp8")):  # fmt: skip
        with pytest.raises(InputError, match=next(iter(bad))):
            build_cache(MISSING_MODEL, rows, tmp_path / "c", tokenizer=tokenizer, progress=False, **bad)
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    for bad in (dict(temperature=math.nan), dict(temperature=math.inf), dict(top_k=-5), dict(batch_size=0)):
        with pytest.raises(InputError, match=next(iter(bad))):
            generate_dataset(teacher, tokenizer, ["x"], tmp_path / "g", **bad)
    assert not (tmp_path / "c").exists() and not (tmp_path / "g").exists()
    with pytest.raises(InputError, match="a int"):  # a prompt that is not text is named, not crashed on
        generate_dataset(teacher, tokenizer, [{"prompt": 5}], tmp_path / "g")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(temperature=math.inf),
        dict(temperature=math.nan),
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(kd_weight=math.nan),
        dict(ce_weight=math.inf),
        dict(beta=math.nan),
        dict(learning_rate=math.nan),
        dict(generation_top_k=-5),
        dict(generation_temperature=math.inf),
        dict(dataset_num_proc=0),
        dict(alpha=math.nan),
        dict(generation_top_p=math.nan),
        dict(per_device_train_batch_size=0),
        dict(gradient_accumulation_steps=0),
    ],
)
def test_distill_config_refuses_non_finite_and_out_of_range_numbers(tmp_path: Path, overrides) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        DistillConfig(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(seq_kd=True), "seq_kd"),
        (dict(lmbda=0.5), "lmbda=0.5"),
        (dict(packing=True), "packing"),
        (dict(temperature=2.0), "temperature=2.0"),
    ],
)
def test_cached_teacher_refuses_settings_it_cannot_serve_before_the_student_loads(
    small_cache: Path, tmp_path: Path, tokenizer, no_model_load, overrides, needle
) -> None:
    teacher = CachedTeacher(small_cache, tokenizer=tokenizer)
    with pytest.raises(CacheError, match=needle):
        Trainer(model=MISSING_MODEL, teacher=teacher, args=config(tmp_path, **overrides),
                train_dataset=arithmetic_dataset(12), processing_class=tokenizer)  # fmt: skip


def test_recipe_numbers_and_bools_have_one_parser(tmp_path: Path, capsys) -> None:
    from test_recipes import _recipe

    recipe = _recipe("code_14b.py")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        recipe.main(["--tiny", "--profile", "rtx_24gb", "--cache_top_k", "-4", "--output_dir", str(out)])
    assert exit.value.code == 2 and "cache_top_k" in capsys.readouterr().err
    assert not (out / "tiny_models").exists()  # refused before the tiny models were even built
    from distill import recipes_support as common

    for spelling in ("y", "yes", "t", "1", "on"):
        parsed, config_, _ = common.parse(recipe.CodeRecipe, recipe.PROFILES, ["--tiny", spelling, "--output_dir",
                                          str(out)], recipe.BASE_TRAINING)  # fmt: skip
        assert parsed.tiny is True and config_.max_steps == common.TINY_TRAINING["max_steps"], spelling
    no_tiny = ["--tiny", "n", "--plan_only", "--output_dir", str(out)]  # plan_only: bf16 accepted on a CPU
    parsed, config_, _ = common.parse(recipe.CodeRecipe, recipe.PROFILES, no_tiny,
                                      recipe.BASE_TRAINING)  # fmt: skip
    assert parsed.tiny is False and config_.max_steps != common.TINY_TRAINING["max_steps"]
    with pytest.raises(SystemExit):
        common.parse(recipe.CodeRecipe, recipe.PROFILES, ["--tiny", "maybe"], recipe.BASE_TRAINING)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f'tiny: "no"\nplan_only: "yes"\noutput_dir: {out}\n')
    parsed, _, _ = common.parse(recipe.CodeRecipe, recipe.PROFILES, [str(yaml_file)], recipe.BASE_TRAINING)
    assert parsed.tiny is False and parsed.plan_only is True


def test_prices_must_be_finite(tmp_path: Path) -> None:
    for price in (math.nan, math.inf, -1.0, "cheap"):
        with pytest.raises(InputError, match="finite|number"):
            with_prices({"H100": price})
        with pytest.raises(InputError, match="finite|number"):
            resolve_price(price)
    nan_file = tmp_path / "prices.json"
    nan_file.write_text('{"H100": NaN}')
    with pytest.raises(InputError, match=r"prices\.json.*H100"):
        load_prices(nan_file)


# ---- unclear messages made clear -----------------------------------------------------------------------------------


def test_text_that_is_not_a_string_is_named_not_called_empty(tokenizer) -> None:
    cases = {
        "int": [{"text": 5}],
        "not valid UTF-8": [{"text": b"\xff\xfe caf\xe9"}],
        "bytes, not text": [{"text": b"ok"}],
    }
    for needle, rows in cases.items():
        with pytest.raises(DataError, match=needle) as error:
            prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, max_length=32)
        assert "empty" not in str(error.value)
    with pytest.raises(DataError, match="`completion` is a int"):
        prepare_dataset([{"prompt": "2+2=", "completion": 4}], tokenizer, max_length=32)


def test_a_list_of_rows_is_accepted_as_a_dataset(tmp_path: Path, tokenizer) -> None:
    rows = arithmetic_dataset(8).to_list()
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    trainer = Trainer(model=student, teacher=teacher, args=config(tmp_path, max_steps=1), train_dataset=rows,
                      eval_dataset=rows[:2], processing_class=tokenizer)  # fmt: skip
    assert len(trainer.train_dataset) == 8
    trainer.train()
    with pytest.raises(DataError, match="row 0 is a str"):
        prepare_dataset(["just a string"], tokenizer, max_length=32)


def test_generate_accepts_the_dtype_names_every_command_accepts(tmp_path: Path, tokenizer, capsys) -> None:
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n")
    argv = ["generate", "--teacher", str(folder), "--dataset", str(data), "--out", str(tmp_path / "out"),
            "--dtype", "bf16", "--max-new-tokens", "3"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_generated"] == 1


def test_malformed_plan_files_name_the_file_with_exit_code_2(tmp_path: Path, capsys) -> None:
    bad_yaml = tmp_path / "prices.yaml"
    bad_yaml.write_text("H100: [2.5\nA100: 1.2\n")
    bad_json = tmp_path / "prices.json"
    bad_json.write_text('{"H100": 2.5,,}')
    nan_yaml = tmp_path / "nan.yaml"
    nan_yaml.write_text("H100: .nan\n")
    for path in (bad_yaml, bad_json, nan_yaml):
        code, err = _cli(["plan", "--student", "Qwen/Qwen2.5-0.5B", "--prices", str(path)], capsys)
        assert code == 2 and str(path) in err and "Traceback" not in err, err
    config_json = tmp_path / "model" / "config.json"
    config_json.parent.mkdir()
    config_json.write_text('{"hidden_size": 64, ')
    code, err = _cli(["plan", "--student", str(config_json.parent)], capsys)
    assert code == 2 and str(config_json) in err, err
    config_json.write_text(json.dumps({"hidden_size": "wide", "intermediate_size": 1, "num_hidden_layers": 1,
                                       "num_attention_heads": 1, "vocab_size": 1}))  # fmt: skip
    code, err = _cli(["plan", "--student", str(config_json)], capsys)
    assert code == 2 and "hidden_size" in err and str(config_json) in err, err


def test_an_edited_or_broken_manifest_fails_at_load_naming_file_and_field(small_cache: Path, tmp_path: Path) -> None:
    broken = _copy(small_cache, tmp_path / "broken")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match=r"broken/manifest\.json is not valid JSON"):
        CachedTeacher(broken)
    for field, edit in (("config.k", ("k",)), ("config.teacher.vocab_rows", ("teacher", "vocab_rows"))):
        for keep_checksums in (True, False):  # caches written before the checksums: the shards are the check
            edited = _copy(small_cache, tmp_path / f"edited-{field}-{keep_checksums}")
            manifest = json.loads((edited / "manifest.json").read_text())
            holder = manifest["config"]
            for key in edit[:-1]:
                holder = holder[key]
            holder[edit[-1]] = 4096 if edit[-1] == "vocab_rows" else 3
            if not keep_checksums:
                del manifest["config_checksums"]
            (edited / "manifest.json").write_text(json.dumps(manifest))
            pattern = "manifest\\.json.*" + field.replace(".", "\\.")
            with pytest.raises(CacheCorruptError, match=pattern):
                CachedTeacher(edited)


def test_missing_local_paths_and_unknown_offline_models_are_named(tmp_path: Path, monkeypatch, tokenizer) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./student", "runs/student", "a/b/c", "~/no-such-distill-model", str(tmp_path / "gone")):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_tokenizer(name)
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_causal_lm(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'distill-tests/no-such-model'.*offline"):
        load_tokenizer("distill-tests/no-such-model")
    _, student = tiny_teacher_student(vocab_size=len(tokenizer))
    with pytest.raises(FileNotFoundError, match=r"no such folder"):
        Trainer(model="./runs/student", teacher=MISSING_MODEL, args=config(tmp_path / "o"),
                train_dataset=arithmetic_dataset(4))  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"'distill-tests/no-such-teacher'.*offline"):
        Trainer(model=student, teacher="distill-tests/no-such-teacher", args=config(tmp_path / "o"),
                train_dataset=arithmetic_dataset(4), processing_class=tokenizer)  # fmt: skip


def test_a_truncated_model_file_is_named(tmp_path: Path, tokenizer) -> None:
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(IncompleteFilesError, match=r"model\.safetensors.*incomplete|incomplete.*model\.safetensors"):
        load_causal_lm(tmp_path / "model")


# ---- a teacher given as a model object: its tokenizer checked as far as it can be ----------------------------------


def test_teacher_object_without_tokenizer_is_checked_or_warned_about(tmp_path: Path, tokenizer) -> None:
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    # 1. Its config names an eos that is an ordinary token of the student's tokenizer: another tokenizer.
    teacher.config.eos_token_id = 300
    with pytest.raises(VocabularyMismatchError, match="eos_token_id 300"):
        Trainer(model=student, teacher=teacher, args=config(tmp_path), train_dataset=arithmetic_dataset(4),
                processing_class=tokenizer)  # fmt: skip
    teacher.config.eos_token_id = tokenizer.eos_token_id
    # 2. Saved with its own (different) tokenizer and loaded from that folder: compared token by token.
    other = train_tiny_tokenizer(texts=["completely different corpus " * 50, "zzz yyy xxx " * 50])
    teacher.save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "teacher")
    reloaded = load_causal_lm(tmp_path / "teacher")
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        Trainer(model=student, teacher=reloaded, args=config(tmp_path), train_dataset=arithmetic_dataset(4),
                processing_class=tokenizer)  # fmt: skip
    # 3. Nothing to compare with: a loud warning says so.
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    with pytest.warns(UserWarning, match="teacher_processing_class"):
        Trainer(model=student, teacher=teacher, args=config(tmp_path), train_dataset=arithmetic_dataset(4),
                processing_class=tokenizer)  # fmt: skip


# ---- the validators themselves -------------------------------------------------------------------------------------


def test_validators_refuse_each_kind_of_bad_value() -> None:
    for value in (0, -4, True, 2.5, "3.0x", None, math.nan):
        with pytest.raises(InputError):
            check_int(value, "n")
    assert check_int("7", "n") == 7 and check_int(8.0, "n") == 8
    for value in (math.nan, math.inf, -math.inf, "nan", "abc", None, True):
        with pytest.raises(InputError):
            check_float(value, "x")
    for text in ("y", "YES", "t", "1", "on", "True"):
        assert check_bool(text, "flag") is True
    for text in ("n", "no", "F", "0", "off"):
        assert check_bool(text, "flag") is False
    with pytest.raises(InputError):
        check_bool("maybe", "flag")


# ---- as a user sees it: exit code 2, one line, no traceback ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "--teacher", MISSING_MODEL, "--dataset", "d.jsonl", "--out", "o", "--top-k", "0"],
        ["eval", "--student", "s", "--teacher", "t", "--dataset", "d", "--out", "o", "--k", "one"],
        ["generate", "--teacher", MISSING_MODEL, "--dataset", "humaneval", "--out", "o"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, argv: list[str]) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "distill.cli", *argv],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line_refusal(finished.returncode, finished.stderr, "error")
    assert not (tmp_path / "o").exists()

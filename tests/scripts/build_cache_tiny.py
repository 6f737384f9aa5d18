"""Build a small top-k cache from a tiny random teacher; the resume tests SIGKILL this mid-build.

Usage: ``python tests/scripts/build_cache_tiny.py OUT_DIR [--delay SECONDS]``. Prints ``ready`` once
the imports are done (so a test can time its kill within the build), then builds and prints ``done``.
``--delay`` sleeps before each teacher forward, stretching the build so kills land inside it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from distill.cache import build_cache  # noqa: E402
from distill.testing import arithmetic_rows, tiny_teacher_student, train_tiny_tokenizer  # noqa: E402

ROWS, ROWS_PER_SHARD, TOP_K = 48, 6, 8


def build(out_dir: str, delay: float = 0.0, announce: bool = False, prepare: Callable | None = None) -> dict:
    """Build the cache into ``out_dir`` (resuming whatever is there); return the manifest.

    ``prepare(teacher)`` runs once the teacher is built (e.g. to hook its forward).
    """
    # One thread: the same float results in this process and in the test process that compares them.
    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    if delay:
        teacher.register_forward_pre_hook(lambda *args: time.sleep(delay))
    if prepare is not None:
        prepare(teacher)
    if announce:
        print("ready", flush=True)
    return build_cache(
        teacher,
        Dataset.from_list(arithmetic_rows(ROWS, seed=3)),
        out_dir,
        tokenizer=tokenizer,
        top_k=TOP_K,
        max_length=64,
        rows_per_shard=ROWS_PER_SHARD,
        batch_tokens=64,
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--delay", type=float, default=0.0)
    options = parser.parse_args()
    build(options.out_dir, options.delay, announce=True)
    print("done", flush=True)


if __name__ == "__main__":
    from teardown import run

    run(main)

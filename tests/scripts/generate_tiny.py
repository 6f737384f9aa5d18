"""Generate a small teacher dataset with the tiny models; the resume-after-SIGKILL test kills it mid-run.

Prints ``ready`` once the model is built (generation starts right after), then ``done``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from distill.generation import generate_dataset
from distill.testing import arithmetic_rows, tiny_teacher_student, train_tiny_tokenizer


def tiny_generation() -> tuple[Any, Any]:
    """The tiny teacher and tokenizer every run of this script uses (the same weights in every process)."""
    torch.set_num_threads(1)  # the same kernels in every run, and no contention on a shared CPU
    tokenizer = train_tiny_tokenizer()
    teacher, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    return teacher, tokenizer


def generate(
    teacher: Any, tokenizer: Any, out_dir: str, prompts: int = 48, prompts_per_shard: int = 4, max_new_tokens: int = 24
) -> Path:
    """Generate 2 completions for each of ``prompts`` arithmetic prompts into ``out_dir`` (resuming it)."""
    rows = [{"prompt": row["prompt"]} for row in arithmetic_rows(prompts, layout="prompt_completion")]
    return generate_dataset(
        teacher,
        tokenizer,
        rows,
        out_dir,
        num_completions=2,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=0.95,
        seed=1234,
        batch_size=4,
        prompts_per_shard=prompts_per_shard,
        teacher_name="tiny-teacher",
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--prompts-per-shard", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    teacher, tokenizer = tiny_generation()
    print("ready", flush=True)
    generate(teacher, tokenizer, args.out_dir, args.prompts, args.prompts_per_shard, args.max_new_tokens)
    print("done", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    from teardown import run

    run(main)

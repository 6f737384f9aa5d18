"""What the trainer examples share: their command line and loading the models and data.

Every example runs two ways: on real models (hub names or local folders, a JSONL / hub dataset),
or with ``--tiny``: tiny random models and a small arithmetic chat task built offline, in seconds on
a CPU (what the tests run).
"""

from __future__ import annotations

import argparse
from typing import Any


def parse_args(description: str, teacher: str, student: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--teacher", default=teacher, help="teacher model: hub name or local folder")
    parser.add_argument("--student", default=student, help="student model: hub name or local folder")
    parser.add_argument("--dataset", help="a .jsonl file or hub dataset with messages / prompt+completion / text rows")
    parser.add_argument("--output-dir", default="out")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--tiny", action="store_true", help="tiny random models and a toy task, offline, seconds")
    return parser.parse_args()


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``(teacher, student, tokenizer, train_dataset)``; teacher and student may be paths (the trainer loads them)."""
    from datasets import Dataset, load_dataset

    if args.tiny:
        from distill.testing import arithmetic_rows, tiny_teacher_student, train_tiny_tokenizer

        tokenizer = train_tiny_tokenizer()
        teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
        return teacher, student, tokenizer, Dataset.from_list(arithmetic_rows(64))
    from transformers import AutoTokenizer

    if args.dataset is None:
        raise SystemExit("--dataset is required unless --tiny is given.")
    if args.dataset.endswith(".jsonl"):
        dataset = load_dataset("json", data_files=args.dataset, split="train")
    else:
        dataset = load_dataset(args.dataset, split="train")
    return args.teacher, args.student, AutoTokenizer.from_pretrained(args.student), dataset


def tiny_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields that make a ``--tiny`` run take seconds on a CPU."""
    if not args.tiny:
        return {"max_steps": args.max_steps}
    return dict(max_steps=8 if args.max_steps < 0 else args.max_steps, use_cpu=True)

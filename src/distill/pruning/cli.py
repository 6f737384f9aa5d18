"""``distill prune``: cut a teacher into a smaller student by calibration importance (``docs/pruning.md``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

SHAPE_FIELDS = {
    "layers": "num_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "mlp": "intermediate_size",
}


def parse_target(text: str) -> float | int | dict[str, int]:
    """``0.5`` (a fraction of the teacher's parameters), ``60e6`` (a count), or ``layers=24,mlp=1024,...``."""
    if "=" in text:
        shape: dict[str, int] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in SHAPE_FIELDS:
                raise ValueError(f"unknown shape field {key!r} in --target; use {', '.join(SHAPE_FIELDS)}")
            try:
                shape[SHAPE_FIELDS[key]] = int(value)
            except ValueError:
                raise ValueError(f"--target {key}={value!r} is not an integer") from None
        return shape
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"--target {text!r}: give a fraction such as 0.5, a parameter count such as 60e6, or a shape such as "
            "layers=24,hidden=512,heads=6,kv_heads=3,mlp=1024"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"--target must be a positive fraction or count; got {text!r}")
    return number if number < 1 else int(number)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to ``distill``'s subparsers."""
    parser = subparsers.add_parser(
        "prune",
        help="prune a teacher into a smaller student (width + depth, by calibration importance)",
        description="Score neurons, heads, hidden channels and blocks of a Llama-family model on calibration rows, "
        "cut it to a target shape or parameter budget, re-fit the kept weights, and save a standard model.",
    )
    parser.add_argument("--model", required=True, help="teacher folder or hub name")
    parser.add_argument("--dataset", required=True, help="calibration rows: save_to_disk folder, json/jsonl/parquet")
    parser.add_argument("--out", required=True, help="folder for the pruned student (must not exist or be empty)")
    parser.add_argument(
        "--target", required=True, type=str,
        help="0.5 = half the teacher's parameters (see --budget-of), 60e6 = a count, or an explicit shape "
        "layers=24,hidden=512,heads=6,kv_heads=3,mlp=1024 (omitted fields stay the teacher's)",
    )  # fmt: skip
    parser.add_argument("--budget-of", choices=("non_embedding", "total"), default="non_embedding")
    parser.add_argument("--split", default="train", help="dataset split (hub / DatasetDict)")
    parser.add_argument("--calibration-rows", type=int, default=256, help="rows used (default 256)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per calibration row (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    parser.add_argument("--score-batches", type=int, default=2, help="batches each candidate shape is scored on")
    parser.add_argument("--skip-loss-batches", type=int, default=0, help="rank blocks by skip loss on N batches")
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="no least-squares re-fit")
    parser.add_argument("--dtype", default="fp32", help="dtype to load and prune in: fp32 (default), bf16, fp16")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: CPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def _check_arguments(args: argparse.Namespace) -> Any:
    """Every argument checked before a model or dataset is loaded; returns the parsed target."""
    for name in ("calibration_rows", "max_length", "batch_size", "score_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.skip_loss_batches < 0:
        raise ValueError(f"--skip-loss-batches must be 0 or more; got {args.skip_loss_batches}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new folder")
    return parse_target(args.target)


def run(args: argparse.Namespace) -> int:
    """Prune and save; print the summary table."""
    try:
        target = _check_arguments(args)
    except ValueError as error:
        raise SystemExit(f"distill prune: {error}") from None
    from transformers import AutoTokenizer

    from distill.cache.cli import load_rows
    from distill.models import load_causal_lm, resolve_dtype
    from distill.pruning import calibration_batches, check_prunable, prune

    model = load_causal_lm(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
    check_prunable(model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = load_rows(args.dataset, args.split)
    batches = calibration_batches(
        rows, tokenizer, max_length=args.max_length, batch_size=args.batch_size, max_rows=args.calibration_rows
    )
    result = prune(
        model, batches, target, budget_of=args.budget_of, score_batches=args.score_batches,
        skip_loss_batches=args.skip_loss_batches, refit=args.refit, progress=args.progress,
    )  # fmt: skip
    result.save(args.out, tokenizer)
    print(result.table())
    print(
        f"\nSaved to {args.out} (pruning.json holds what survived). Load it with AutoModelForCausalLM."
        f"from_pretrained({str(args.out)!r}), then heal it with distillation: docs/pruning.md."
    )
    return 0

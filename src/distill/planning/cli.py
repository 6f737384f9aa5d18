"""``distill plan``: will a distillation run fit, how fast will it go, what will it cost (``docs/planning.md``).

Exit codes: 0 the run fits (with ``--all-gpus``: on at least one GPU type), 3 it does not, 2 bad
arguments (an unknown model or GPU, an impossible combination).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from distill.checks import InputError, arg_float, arg_int
from distill.planning.gpus import GPUS, load_prices, with_prices
from distill.planning.setup import OPTIMIZERS, PRECISIONS, SHARDINGS, TEACHER_MODES

EXIT_FITS, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 2, 3


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``distill``'s subparsers."""
    parser = subparsers.add_parser(
        "plan",
        help="predict GPU memory, time and cost of a distillation run before launching it",
        description="Predict, per GPU, the peak memory of a distillation run item by item, whether it fits, its "
        "throughput, and the GPU-hours and dollars of a token budget. Models are catalogue names or config.json "
        "paths (no weights are read). Exit code 0: fits; 3: does not fit; 2: bad arguments.",
    )
    parser.add_argument(
        "--student", required=True, help="catalogue name (e.g. Qwen/Qwen2.5-Coder-1.5B) or config.json"
    )
    parser.add_argument("--teacher", default=None, help="catalogue name or config.json (optional for cache/server)")
    parser.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPUS)} (prefixes work), or cpu")
    parser.add_argument("--num-gpus", type=arg_int(1), default=1)
    parser.add_argument("--seq-len", type=arg_int(1), default=2048, help="tokens per row (max_length)")
    parser.add_argument("--batch", type=arg_int(1), default=1, help="rows per micro-batch per GPU")
    parser.add_argument("--grad-accum", type=arg_int(1), default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lora-rank", type=arg_int(1), default=None, help="LoRA rank (default: full fine-tune)")
    parser.add_argument("--qlora", action="store_true", help="4-bit student base with LoRA (rank 16 by default)")
    parser.add_argument("--teacher-mode", choices=TEACHER_MODES, default="bf16")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--loss-impl", choices=("fused", "dense"), default="fused")
    parser.add_argument("--loss-chunk-size", type=arg_int(1), default=None, help="fused-loss tokens per chunk")
    parser.add_argument("--divergence", default="jsd", help="distill's loss: jsd, forward_kl, reverse_kl, ...")
    parser.add_argument("--sharding", choices=SHARDINGS, default="none")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--precision", choices=PRECISIONS, default="mixed")
    parser.add_argument(
        "--tokens",
        type=arg_float(0, exclusive_minimum=True),
        default=None,
        help="training tokens per epoch, e.g. 50e6",
    )
    parser.add_argument("--epochs", type=arg_float(0, exclusive_minimum=True), default=1.0)
    parser.add_argument(
        "--mfu",
        type=arg_float(0, 1, exclusive_minimum=True),
        default=None,
        help="model FLOPs utilisation for every part",
    )
    parser.add_argument("--on-policy", type=arg_float(0, 1), default=0.0, help="fraction of on-policy steps (lmbda)")
    parser.add_argument("--max-new-tokens", type=arg_int(1), default=128)
    parser.add_argument("--prices", default=None, help="JSON/YAML file of {gpu: USD per GPU-hour}")
    parser.add_argument("--all-gpus", action="store_true", help="one line per catalogue GPU")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
    return parser


def _plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        num_gpus=args.num_gpus,
        seq_len=args.seq_len,
        per_device_batch=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        lora_rank=args.lora_rank,
        qlora=args.qlora,
        teacher_mode=args.teacher_mode,
        gradient_checkpointing=args.gradient_checkpointing,
        loss_impl=args.loss_impl,
        loss_chunk_size=args.loss_chunk_size,
        divergence=args.divergence,
        sharding=args.sharding,
        optimizer=args.optimizer,
        precision=args.precision,
        tokens=args.tokens,
        epochs=args.epochs,
        mfu=args.mfu,
        on_policy_fraction=args.on_policy,
        max_new_tokens=args.max_new_tokens,
    )


def run(args: argparse.Namespace) -> int:
    """Plan the run; print the table (or JSON); return 0 if it fits, 3 if not, 2 on bad arguments."""
    from distill.planning.plan import plan_run
    from distill.planning.report import format_comparison, format_plan

    try:
        catalogue = with_prices(load_prices(args.prices)) if args.prices else dict(GPUS)
        gpus = list(catalogue) if args.all_gpus else [args.gpu]
        plans = [
            plan_run(args.student, args.teacher, gpu=gpu, catalogue=catalogue, suggest=not args.all_gpus,
                     **_plan_kwargs(args))
            for gpu in gpus
        ]  # fmt: skip
    except (KeyError, ValueError, OSError, InputError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"distill plan: {message}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        payload: Any = [plan.to_dict() for plan in plans] if args.all_gpus else plans[0].to_dict()
        print(json.dumps(payload, indent=2))
    elif args.all_gpus:
        print(format_comparison(plans))
    else:
        print(format_plan(plans[0]))
    return EXIT_FITS if any(plan.fits for plan in plans) else EXIT_DOES_NOT_FIT

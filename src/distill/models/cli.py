"""``distill merge``: a LoRA student's adapters folded into its base model, saved as a standard model folder."""

from __future__ import annotations

import argparse
from typing import Any

from distill.checks import arg_dtype


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distill merge`` to ``subparsers``."""
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA student's adapters into its base model (a standard transformers folder)",
        description="Load the base model named in ADAPTERS/adapter_config.json (or --base) unquantized, add the "
        "adapters, merge them (peft merge_and_unload) and save the model and tokenizer to --out.",
    )
    parser.add_argument("adapters", help="folder a LoRA run saved (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="empty or new folder for the merged model")
    parser.add_argument("--base", default=None, help="base model folder or hub id (default: the adapters' own)")
    parser.add_argument(
        "--dtype", type=arg_dtype, default="auto", help="dtype of the merged weights (default: as saved)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Merge and save; print where the model is and how to load it."""
    from distill.models.merge import load_snippet, merge_adapters

    folder = merge_adapters(args.adapters, args.out, base=args.base, dtype=args.dtype)
    print(f"Merged model and tokenizer in {folder.resolve()}. Load them with:")
    print(load_snippet(folder))
    return 0

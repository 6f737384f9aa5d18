"""The ``distill`` command: thin subcommands over the library.

Each subcommand lives with the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide a subcommand (``distill cache``, ``distill generate``, ...).
SUBCOMMAND_MODULES = (
    "distill.cache.cli",
    "distill.generation.cli",
    "distill.evaluation.cli",
    "distill.planning.cli",
    "distill.sandbox.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``distill`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation of LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand; return its exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

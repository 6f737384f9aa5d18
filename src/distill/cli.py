"""The ``distill`` command: thin subcommands over the library.

Each subcommand lives with the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit code).

Bad input (a flag's value, a missing file, a folder that holds something else) ends the command with
one line saying what is wrong and what to do, and exit code 2, before any model is loaded; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from distill.checks import InputError

# Modules that provide a subcommand (``distill cache``, ``distill generate``, ...).
SUBCOMMAND_MODULES = (
    "distill.cache.cli",
    "distill.generation.cli",
    "distill.evaluation.cli",
    "distill.planning.cli",
    "distill.pruning.cli",
    "distill.sandbox.cli",
)
EXIT_BAD_INPUT = 2
# Errors that mean "the input is wrong", by module and class, looked up only if their module was imported.
_BAD_INPUT_ELSEWHERE = (
    ("distill.losses.vocab", "VocabularyMismatchError"),
    ("distill.teachers.server", "TokenizerMismatchError"),
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage block is in ``--help``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``distill`` argument parser with every subcommand registered."""
    parser = _Parser(prog="distill", description="Knowledge distillation of LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def is_bad_input(error: BaseException) -> bool:
    """Whether ``error`` reports a user's mistake (bad value, missing or foreign file) rather than a bug."""
    if isinstance(error, (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    for module, name in _BAD_INPUT_ELSEWHERE:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand; return its exit code.

    ``DISTILL_DEBUG=1`` shows the traceback of a bad-input error too.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        if not is_bad_input(error) or os.environ.get("DISTILL_DEBUG"):
            raise
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        print(f"distill {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

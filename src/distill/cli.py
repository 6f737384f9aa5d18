"""The ``distill`` command: thin subcommands over the library.

Each subcommand lives with the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit code). Only the chosen
subcommand's module is imported (several of them import torch, seconds on a cold start): the others are
listed by name and one-line help from :data:`SUBCOMMANDS`, so ``distill --help`` and ``distill --version``
load no model library.

Bad input (a flag's value, a missing file, a folder that holds something else) ends the command with
one line saying what is wrong and what to do, and exit code 2, before any model is loaded; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from distill.checks import InputError

# Subcommand -> (module that registers it, its one-line help as that module gives it; a test keeps them equal).
SUBCOMMANDS = {
    "cache": (
        "distill.cache.cli",
        "run a teacher once over a dataset and store its top-k log-probs (resumable)",
    ),
    "generate": ("distill.generation.cli", "sample teacher completions for prompts (sequence-level KD data)"),
    "eval": (
        "distill.evaluation.cli",
        "compare a student with its teacher: quality kept vs cost saved (report card)",
    ),
    "plan": (
        "distill.planning.cli",
        "predict GPU memory, time and cost of a distillation run before launching it",
    ),
    "prune": (
        "distill.pruning.cli",
        "prune a teacher into a smaller student (width + depth, by calibration importance)",
    ),
    "doctor": ("distill.sandbox.cli", "check the kernel layers the sandbox for model-written code needs"),
    "merge": (
        "distill.models.cli",
        "merge a LoRA student's adapters into its base model (a standard transformers folder)",
    ),
}
SUBCOMMAND_MODULES = tuple(module for module, _ in SUBCOMMANDS.values())
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


def version() -> str:
    """The installed package's version (its metadata), or ``distill.__version__`` when run from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("distill")
    except metadata.PackageNotFoundError:
        from distill import __version__

        return __version__


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``distill`` argument parser.

    Args:
        commands: subcommands whose modules are imported and whose full parsers are registered; the others
            are listed by name and help only (their flags unknown). ``None``: every subcommand in full.
    """
    parser = _Parser(prog="distill", description="Knowledge distillation of LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    full = set(SUBCOMMANDS) if commands is None else set(commands)
    for name, (module, help_line) in SUBCOMMANDS.items():
        if name in full:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), if it is a known one."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
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

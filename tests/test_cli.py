"""The ``distill`` command itself: ``--version``, and a ``--help`` that loads no model library.

Imports are checked in fresh interpreters (subprocesses): this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import distill
from distill import cli

SRC = str(Path(distill.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft")
# Runs ``distill ARGV`` in-process and prints, as JSON, its exit code and which heavy libraries it imported.
PROBE = """
import json, sys
from distill.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = [m for m in HEAVY if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""".replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> tuple[dict, str]:
    """Exit code and heavy imports of ``distill ARGV`` in a fresh interpreter, and its stdout."""
    finished = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], env=ENV, capture_output=True, text=True, timeout=120
    )
    return json.loads(finished.stderr.strip().splitlines()[-1]), finished.stdout


def test_top_level_help_lists_every_command_without_importing_torch() -> None:
    result, out = _probe("--help")
    assert result == {"code": 0, "heavy": []}
    for name, (_, help_line) in cli.SUBCOMMANDS.items():
        assert name in out and help_line.split()[0] in out


# prune is left out: ``distill.pruning``'s package imports torch (its CLI module cannot be reached without it).
@pytest.mark.parametrize("command", ["cache", "generate", "eval", "plan", "doctor", "merge", "prune"])
def test_subcommand_help_imports_no_model_library(command: str) -> None:
    result, out = _probe(command, "--help")
    assert result == {"code": 0, "heavy": []}
    assert out.startswith(f"usage: distill {command} ")


def test_version_is_the_package_metadata_version() -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "distill.cli", "--version"], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0
    assert finished.stdout.strip() == f"distill {metadata.version('distill')}"
    assert cli.version() == metadata.version("distill") == distill.__version__


def test_listed_help_lines_are_the_ones_each_module_registers() -> None:
    listed = {action.dest: action.help for action in _subparsers(cli.build_parser([]))._choices_actions}
    registered = {action.dest: action.help for action in _subparsers(cli.build_parser())._choices_actions}
    assert listed == registered == {name: help_line for name, (_, help_line) in cli.SUBCOMMANDS.items()}


def test_an_unknown_command_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["distil-me"])
    assert stop.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'distil-me'" in err


def test_the_chosen_command_parses_in_full() -> None:
    assert cli.chosen_command(["plan", "--student", "x"]) == "plan"
    assert cli.chosen_command(["--help"]) is None and cli.chosen_command(["nope"]) is None
    args = cli.build_parser(["plan"]).parse_args(["plan", "--student", "Qwen/Qwen2.5-0.5B", "--gpu", "h100"])
    assert args.command == "plan" and args.gpu == "h100"


def _subparsers(parser):
    return next(action for action in parser._actions if action.choices and action.dest == "command")

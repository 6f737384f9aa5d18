"""Inputs shared by the jobs' command lines: a teacher behind ``--server`` (rows come from :mod:`distill.data.rows`).

Used by ``distill cache``, ``distill generate`` and ``distill prune``, so that no command imports another's CLI
module. Light on purpose: ``datasets`` and the teachers are imported inside the functions, so a command's
``--help`` loads no model library (``tests/test_cli.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

from distill.checks import InputError, arg_float, arg_int, check_device

__all__ = ["add_server_arguments", "check_server_arguments", "server_teacher"]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a ``--server`` teacher (shared by ``distill cache`` and ``distill generate``)."""
    group = parser.add_argument_group("teacher behind a vLLM server (--server)")
    group.add_argument("--served-model", default="teacher", help="the server's --served-model-name (default teacher)")
    group.add_argument("--max-concurrency", type=arg_int(1), default=8, help="requests in flight (default 8)")
    group.add_argument(
        "--timeout", type=arg_float(0, exclusive_minimum=True), default=120.0, help="seconds per request (default 120)"
    )
    group.add_argument(
        "--retries", type=arg_int(0), default=6, help="retries after connection errors and 5xx (default 6)"
    )


def check_server_arguments(args: argparse.Namespace) -> None:
    """Refuse ``--server`` without ``--tokenizer``, and a ``--device`` this machine lacks, before anything loads."""
    if args.server is not None and args.tokenizer is None:
        raise InputError("--server needs --tokenizer (the student's tokenizer, which the server's model must share).")
    check_device(getattr(args, "device", None))


def server_teacher(args: argparse.Namespace, tokenizer: Any, top_k: int = 1) -> Any:
    """The :class:`~distill.teachers.ServerTeacher` of ``--server`` (its tokenizer is checked against the server)."""
    from distill.teachers.server import ServerTeacher

    return ServerTeacher(
        args.server, args.served_model, top_k=top_k, tokenizer=tokenizer, max_concurrency=args.max_concurrency,
        timeout_s=args.timeout, retries=args.retries,
    )  # fmt: skip

"""``distill plan``: will a distillation run fit, how fast will it go, what will it cost (``docs/planning.md``).

Exit codes: 0 the run fits (with ``--all-gpus``: on at least one GPU type), 3 it does not, 2 bad
arguments (an unknown model or GPU, an impossible combination).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import Field, fields
from typing import Any

from distill.checks import InputError, arg_bool, arg_float, arg_int
from distill.planning.gpus import GPUS, load_prices, with_prices
from distill.planning.setup import RunSetup

EXIT_FITS, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 2, 3


# Flags of round 1, renamed to DistillConfig's names: a clear error instead of "unrecognized arguments".
RENAMED_FLAGS = {
    "--seq-len": "--max-length",
    "--batch": "--per-device-train-batch-size",
    "--grad-accum": "--gradient-accumulation-steps",
    "--loss-impl": "--loss-implementation",
    "--divergence": "--loss",
    "--optimizer": "--optim",
    "--on-policy": "--lmbda",
    "--epochs": "--num-train-epochs",
}
_ARG_TYPES = {"int": arg_int, "float": arg_float}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``distill``'s subparsers: one flag per :class:`RunSetup` field."""
    parser = subparsers.add_parser(
        "plan",
        help="predict GPU memory, time and cost of a distillation run before launching it",
        description="Predict, per GPU, the peak memory of a distillation run item by item, whether it fits, its "
        "throughput, and the GPU-hours and dollars of a token budget. Models are catalogue names or config.json "
        "paths (no weights are read). The flags are DistillConfig's names where it has the knob (--max-length or "
        "--max_length). Exit code 0: fits; 3: does not fit; 2: bad arguments.",
    )
    for spec in fields(RunSetup):
        parser.add_argument(*flag_names(spec.name), dest=spec.name, **_argument(spec))
    parser.add_argument("--prices", default=None, help="JSON/YAML file of {gpu: USD per GPU-hour}")
    parser.add_argument("--all-gpus", action="store_true", help="one line per catalogue GPU")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    for old, new in RENAMED_FLAGS.items():
        parser.add_argument(
            old, action=_Renamed, nargs="?", new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    parser.set_defaults(func=run)
    return parser


def flag_names(name: str) -> tuple[str, ...]:
    """``--max-length`` and ``--max_length`` (the recipes' spelling) for the field ``max_length``."""
    dashed = f"--{name.replace('_', '-')}"
    return (dashed, f"--{name}") if "_" in name else (dashed,)


def _argument(spec: Field[Any]) -> dict[str, Any]:
    """``add_argument`` keywords for one field, from its declaration (help, default, choices, bounds)."""
    meta = spec.metadata
    if spec.name in _LOOKED_UP:  # names looked up in the catalogues by plan_run
        required = spec.name == "student"
        return {"required": required, "default": {"gpu": "H100"}.get(spec.name), "help": meta["help"]}
    default = spec.default
    shown = "" if default is None else f" (default {default})"
    keywords: dict[str, Any] = {"default": default, "help": meta["help"] + shown}
    if "choices" in meta:
        keywords["choices"] = meta["choices"]
    elif meta.get("check") == "bool":  # --qlora, or --qlora false
        keywords.update(nargs="?", const=True, type=arg_bool, metavar="BOOL")
    elif "check" in meta:
        bounds = {key: meta[key] for key in ("minimum", "maximum", "exclusive_minimum") if key in meta}
        keywords["type"] = _ARG_TYPES[meta["check"]](**bounds)
    return keywords


class _Renamed(argparse.Action):
    """A round-1 flag: fails with its new name."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error(f"{self.option_strings[0]} is now {self.new} (DistillConfig's name for the same setting).")


def _plan_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RunSetup` fields from the parsed flags (the models and GPU are passed on their own)."""
    return {spec.name: getattr(args, spec.name) for spec in fields(RunSetup) if spec.name not in _LOOKED_UP}


_LOOKED_UP = ("student", "teacher", "gpu")


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

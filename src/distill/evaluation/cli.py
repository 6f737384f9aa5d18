"""``distill eval``: held-out KD metrics, optional HumanEval pass@k, speed and cost, written as a report card."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

from distill.checks import InputError, arg_dtype, arg_float, arg_int, check_device, check_int


def _k_list(text: str) -> list[int]:
    """``--k``: comma-separated whole numbers >= 1, e.g. ``1,10``."""
    try:
        ks = [check_int(part, "each k", minimum=1) for part in text.split(",") if part.strip()]
    except InputError as error:
        raise argparse.ArgumentTypeError(f"{error} Give comma-separated whole numbers, e.g. 1,10.") from None
    if not ks:
        raise argparse.ArgumentTypeError("give at least one k, e.g. 1 or 1,10.")
    return ks


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand to ``subparsers``."""
    parser = subparsers.add_parser(
        "eval",
        help="compare a student with its teacher: quality kept vs cost saved (report card)",
        description="Held-out KL / top-1 agreement / cross-entropy on a dataset, optional HumanEval pass@k in "
        "the sandbox, generation speed, memory and cost; writes report.md, report.json and plots to --out.",
    )
    parser.add_argument("--student", required=True, help="the KD student: a save_pretrained folder or hub id")
    parser.add_argument("--teacher", required=True, help="the teacher: a save_pretrained folder or hub id")
    parser.add_argument("--baseline", default=None, help="a student of the same size trained without KD")
    parser.add_argument(
        "--dataset", required=True, help="held-out rows: .json/.jsonl/.parquet/.csv or a save_to_disk folder"
    )
    parser.add_argument("--tokenizer", default=None, help="the students' tokenizer (default: --student)")
    parser.add_argument("--max-rows", type=arg_int(1), default=None, help="evaluate only the first R rows")
    parser.add_argument("--max-length", type=arg_int(2), default=1024, help="tokens per row (longer rows are cut)")
    parser.add_argument("--batch-size", type=arg_int(1), default=8, help="rows per forward pass")
    parser.add_argument("--humaneval", type=arg_int(0), default=0, metavar="N", help="pass@k on the first N problems")
    parser.add_argument("--samples", type=arg_int(1), default=1, help="completions per HumanEval problem (n)")
    parser.add_argument("--k", type=_k_list, default=[1], help="comma-separated k for pass@k (only k <= --samples)")
    parser.add_argument(
        "--temperature", type=arg_float(0), default=None, help="sampling temperature (default: 0 for n=1, else 0.8)"
    )
    parser.add_argument("--max-new-tokens", type=arg_int(1), default=256, help="tokens per HumanEval completion")
    parser.add_argument("--sandbox-workers", type=arg_int(1), default=2, help="tests run in parallel")
    parser.add_argument(
        "--sandbox-isolation",
        choices=("strict", "weak"),
        default="strict",
        help="weak: run the tests even where the kernel lacks a sandbox layer (see `distill doctor`)",
    )
    price = parser.add_mutually_exclusive_group()
    price.add_argument("--gpu", default=None, help="GPU name whose hourly price distill.planning knows (e.g. H100)")
    price.add_argument("--price-per-hour", type=arg_float(0), default=None, help="USD per hour of this device")
    parser.add_argument("--no-speed", action="store_true", help="skip the generation speed measurement")
    parser.add_argument("--speed-batch-size", type=arg_int(1), default=8)
    parser.add_argument("--speed-new-tokens", type=arg_int(1), default=64)
    parser.add_argument(
        "--speed-repeats", type=arg_int(1), default=5,
        help="timed generation runs per model (default 5): the report gives their median and min-max",
    )  # fmt: skip
    parser.add_argument("--speed-warmup", type=arg_int(0), default=1, help="untimed runs first (default 1)")
    parser.add_argument("--dtype", type=arg_dtype, default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=arg_int(None), default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--out", required=True, help="output folder for the report")
    parser.set_defaults(func=run)


def _log_history(model_path: str) -> list[dict[str, Any]] | None:
    """``log_history`` of the ``trainer_state.json`` a Trainer saved beside the model, if there is one."""
    state = Path(model_path) / "trainer_state.json"
    if not state.is_file():
        return None
    return json.loads(state.read_text(encoding="utf-8")).get("log_history")


def _budget(model_path: str) -> dict[str, Any] | None:
    """What training the model at ``model_path`` cost: from the model card distill saved with it, else from the
    ``trainer_state.json`` a Trainer saved beside it."""
    from distill.trainer.model_card import read_budget, training_seconds

    recorded = read_budget(model_path)
    if recorded is not None:
        return recorded
    state_file = Path(model_path) / "trainer_state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text(encoding="utf-8"))
    budget: dict[str, Any] = {"optimizer steps": state.get("global_step")}
    if state.get("train_batch_size"):
        budget["rows per step (per device)"] = state["train_batch_size"]
    finished = next((entry for entry in reversed(state.get("log_history") or []) if "train_runtime" in entry), {})
    if "train_runtime" in finished:
        budget["training seconds"] = training_seconds(finished["train_runtime"])
    for key, name in (("num_input_tokens_seen", "training tokens"), ("total_flos", "training FLOPs")):
        if state.get(key):
            budget[name] = state[key]
    return {key: value for key, value in budget.items() if value is not None} or None


def _tokenizer(path: str, what: str) -> Any:
    from distill.models.loading import load_tokenizer

    return load_tokenizer(path, what)


def run(args: argparse.Namespace) -> int:
    """Run ``distill eval`` with parsed arguments; returns the exit code."""
    import torch

    from distill.evaluation.metrics import heldout_metrics
    from distill.evaluation.report import ModelResult, write_report
    from distill.models.loading import freeze, load_causal_lm

    rows, price, tasks = _checked_inputs(args)  # before any model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _tokenizer(args.tokenizer or args.student, "--tokenizer" if args.tokenizer else "--student")
    try:
        teacher_tokenizer = _tokenizer(args.teacher, "--teacher")
    except (OSError, ValueError):
        teacher_tokenizer = tokenizer  # a teacher folder without tokenizer files: assume the students' one

    def load(path: str) -> torch.nn.Module:
        print(f"distill eval: loading {path}", file=sys.stderr)
        return freeze(load_causal_lm(path, dtype=args.dtype, device=device))

    teacher = load(args.teacher)
    row_sums: dict[str, Any] = {}  # per model path: per-row sums for the paired KD-vs-baseline comparison
    students: dict[str, ModelResult] = {}
    teacher_metrics: dict[str, float] = {}
    for role, path in (("student", args.student), ("baseline", args.baseline)):
        if path is None:
            continue
        model = load(path)
        print(f"distill eval: held-out metrics of the {role}", file=sys.stderr)
        heldout = heldout_metrics(
            model,
            teacher,
            tokenizer,
            rows,
            teacher_tokenizer=teacher_tokenizer,
            max_length=args.max_length,
            batch_size=args.batch_size,
            progress=args.progress,
        )
        row_sums[path] = heldout.student_row_sums()
        students[role] = _evaluate(args, path, model, tokenizer, heldout.student_metrics(), tasks, price, row_sums)
        teacher_metrics = heldout.teacher_metrics()  # the same for every student: the teacher's own scores
        del model
        gc.collect()
    teacher_result = _evaluate(args, args.teacher, teacher, teacher_tokenizer, teacher_metrics, tasks, price, row_sums)
    sandbox = tasks[0].sandbox_record if tasks else None
    card = write_report(
        args.out, teacher_result, students["student"], students.get("baseline"), sandbox=sandbox,
        budget=_budget(args.student),
    )  # fmt: skip
    _print_summary(card, teacher_result, students)
    return 0


def _checked_inputs(args: argparse.Namespace) -> tuple[Any, float | None, list[Any]]:
    """What can fail without weights, checked (numbers: while parsing): the rows, the price per hour, the tasks."""
    from distill.evaluation.metrics import load_rows
    from distill.evaluation.speed import resolve_price
    from distill.models.loading import check_model_source

    check_device(args.device)
    rows = load_rows(args.dataset, max_rows=args.max_rows)
    price = resolve_price(args.price_per_hour, args.gpu)
    for flag in ("student", "teacher", "baseline", "tokenizer"):
        if getattr(args, flag) is not None:
            check_model_source(getattr(args, flag), f"--{flag}")
    return rows, price, _tasks(args)


def _tasks(args: argparse.Namespace) -> list[Any]:
    """The generation tasks to score every model on: HumanEval pass@k when ``--humaneval`` asks for it."""
    from distill.evaluation.tasks import HumanEvalPassAtK, humaneval_problems

    if not args.humaneval:
        return []
    return [
        HumanEvalPassAtK(
            humaneval_problems(first=args.humaneval),
            num_samples=args.samples,
            ks=args.k,  # those above --samples are left out of the report (HumanEvalPassAtK)
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
            workers=args.sandbox_workers,
            isolation=args.sandbox_isolation,
            progress=args.progress,
        )
    ]


def _evaluate(
    args: argparse.Namespace,
    path: str,
    model: Any,
    tokenizer: Any,
    metrics: dict[str, float],
    tasks: list[Any],
    price: float | None,
    row_sums: dict[str, Any],
) -> Any:
    """One model's :class:`~distill.evaluation.report.ModelResult`: its held-out ``metrics``, tasks and speed.

    ``row_sums`` maps model paths to their per-row held-out sums (the paired KD-vs-baseline comparison).
    """
    from distill.evaluation.report import ModelResult
    from distill.evaluation.speed import measure_speed
    from distill.evaluation.tasks import run_tasks, task_problem_scores

    metrics = {**metrics, **run_tasks(model, tokenizer, tasks)}
    speed = None
    if not args.no_speed:
        speed = measure_speed(
            model,
            tokenizer,
            batch_size=args.speed_batch_size,
            new_tokens=args.speed_new_tokens,
            warmup=args.speed_warmup,
            repeats=args.speed_repeats,
            price_per_hour=price,
            progress=args.progress,
        )
    return ModelResult.from_results(
        path, metrics, speed=speed, log_history=_log_history(path), row_sums=row_sums.get(path),
        problem_scores=task_problem_scores(tasks),
    )  # fmt: skip


def _print_summary(card: Any, teacher: Any, students: dict[str, Any]) -> None:
    """The report's headline, its summary tables and where its files are, on stdout."""
    from distill.evaluation.report import summary_tables

    print(card.headline)
    print()
    print(summary_tables(teacher, students["student"], students.get("baseline")))
    if card.plots_skipped:
        print(f"\nPlots skipped: {card.plots_skipped}")
    print(f"\nReport: {', '.join(str(path) for path in card.files)}")

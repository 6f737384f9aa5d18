"""The model card (``README.md``) saved with the student: which teacher, which loss, which data, what it cost.

A student folder read a year later should say how it was made. :func:`model_card` writes the Hugging Face
card layout (YAML metadata, then markdown) from what the run knows: the teacher as it was given (a name, a
cache folder, a server), the objective with its settings, the training rows as the data report counted
them, and the budget (optimizer steps, rows and tokens seen, seconds, devices). A card the user wrote
(a ``README.md`` without our marker) is never overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_MARKER",
    "card_for_trainer",
    "describe_data",
    "describe_teacher",
    "model_card",
    "read_budget",
    "trainer_budget",
    "write_model_card",
]

# The first line of the card's body; a README.md without it is the user's own and is left alone.
CARD_MARKER = "<!-- written by distill: the record of how this student was made -->"
# The budget again, as JSON in a comment, for `distill eval` to print on its report card.
_BUDGET_PREFIX = "<!-- distill budget: "


def describe_teacher(teacher: Any, given: Any = None) -> str:
    """One line naming the teacher: the name or path it was given, its cache folder, its server, or its model.

    Args:
        teacher: the resolved :class:`distill.teachers.Teacher` (or a list of them for an ensemble).
        given: what the user passed as ``teacher=`` (a name or path is the best name there is).
    """
    if isinstance(given, (str, os.PathLike)):
        return f"`{os.fspath(given)}`"
    if isinstance(teacher, (list, tuple)):
        return ", ".join(describe_teacher(one) for one in teacher)
    kind = type(teacher).__name__
    reader = getattr(teacher, "reader", None)
    if reader is not None and hasattr(reader, "path"):  # CachedTeacher
        name = reader.manifest.get("teacher") if isinstance(getattr(reader, "manifest", None), dict) else None
        return f"top-k cache `{reader.path}`" + (f" of `{name}`" if name else "")
    if hasattr(teacher, "base_url"):  # ServerTeacher
        return f"`{teacher.model}` served at {teacher.base_url}"
    if kind == "DataTeacher":
        return "none: the data's next token (plain fine-tuning, the baseline)"
    model = getattr(teacher, "model", None)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if model is not None:
        parameters = sum(p.numel() for p in model.parameters())
        return (f"`{name}`" if name else f"a {type(model).__name__} built in memory") + f" ({parameters:,} parameters)"
    return kind


def describe_data(dataset: Any, report: Any) -> str:
    """One line on the training rows: the dataset's name or files where known, and the data report's counts."""
    names = []
    info = getattr(dataset, "info", None)
    for attribute in ("dataset_name", "builder_name"):
        value = getattr(info, attribute, None)
        if value and value not in names:
            names.append(str(value))
    source = f"`{'/'.join(names)}`: " if names else ""
    return source + (str(report) if report is not None else f"{type(dataset).__name__}")


def _loss(args: Any) -> str:
    parts = [f"`{args.loss}`"]
    if args.loss in ("jsd", "generalized_jsd"):
        parts.append(f"beta={args.beta}")
    if "skew" in str(args.loss):
        parts.append(f"alpha={args.alpha}")
    parts.append(f"temperature={args.temperature}")
    objective = f"{args.kd_weight} x KD ({', '.join(parts)})"
    if args.ce_weight:
        objective += f" + {args.ce_weight} x cross-entropy on the data"
    if args.hidden_loss_weight:
        objective += f" + {args.hidden_loss_weight} x hidden-state `{args.hidden_loss}`"
    tokens = "completion tokens" if args.completion_only_loss else "every token"
    policy = (
        f"on-policy for a fraction lmbda={args.lmbda} of batches" if args.lmbda else "off-policy (the dataset's rows)"
    )
    if args.seq_kd:
        policy = "sequence-level KD on the teacher's completions"
    return f"{objective}, on {tokens}, {policy}"


def model_card(
    *,
    student: str,
    teacher: str,
    args: Any,
    data: str,
    budget: Mapping[str, Any],
    load_snippet: str,
    base_model: str | None = None,
) -> str:
    """The card's text.

    Args:
        student: what was trained (its starting point's name, or its class and size).
        teacher: :func:`describe_teacher`'s line.
        args: the run's :class:`distill.DistillConfig`.
        data: :func:`describe_data`'s line.
        budget: e.g. ``{"optimizer steps": 40, "training tokens": 20480, "training seconds": 95.0}``.
        load_snippet: the lines that load the folder (:func:`distill.models.merge.load_snippet`).
        base_model: a hub id the student started from, for the card's metadata.
    """
    metadata = ["---", "library_name: transformers", "tags:", "- distill", "- knowledge-distillation"]
    if base_model:
        metadata.append(f"base_model: {base_model}")
    metadata.append("---")
    budget = {key: value for key, value in budget.items() if value is not None}
    budget_lines = [f"- {key}: {_value(value)}" for key, value in budget.items()]
    body = [
        CARD_MARKER,
        "# Distilled student",
        f"Trained with `distill` (knowledge distillation of LLMs) from the teacher {teacher}.",
        "| | |\n|---|---|\n"
        f"| student | {student} |\n| teacher | {teacher} |\n| loss | {_loss(args)} |\n| data | {data} |",
        "## Budget\n\n"
        + ("\n".join(budget_lines) or "- unknown (the card was written before training)")
        + f"\n\n{_BUDGET_PREFIX}{json.dumps(budget)} -->",
        "## Load it\n\n```python\n" + load_snippet + "\n```",
        f"Settings: learning rate {args.learning_rate}, {args.lr_scheduler_type} schedule, max_length "
        f"{args.max_length}, seed {args.seed}. The full configuration is in `training_args.bin` when the trainer "
        "saved it (`torch.load(..., weights_only=False)`).",
    ]
    return "\n".join(metadata) + "\n" + "\n\n".join(body) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def read_budget(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The budget recorded in the card distill wrote in ``folder`` (None without one)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(_BUDGET_PREFIX) and line.endswith(" -->"):
            try:
                return json.loads(line[len(_BUDGET_PREFIX) : -len(" -->")]) or None
            except ValueError:
                return None
    return None


def write_model_card(folder: str | os.PathLike, text: str) -> Path | None:
    """Write ``README.md`` in ``folder`` unless a README.md there is the user's own; returns the path written."""
    path = Path(folder) / "README.md"
    if path.exists() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    path.write_text(text, encoding="utf-8")
    return path


def training_seconds(runtime: float) -> float:
    """``runtime`` (seconds) as the budget shows it: 0.1 s steps from 1 s up, two significant digits below.

    Rounding a 0.04 s run to one decimal wrote "training seconds: 0.0", which reads as no training at all.
    """
    runtime = float(runtime)
    return round(runtime, 1) if runtime >= 1 else float(f"{runtime:.2g}")


def trainer_budget(trainer: Any) -> dict[str, Any]:
    """What the run has cost so far, from a :class:`distill.Trainer`'s state and arguments."""
    args, state = trainer.args, trainer.state
    processes = max(int(getattr(args, "world_size", 1) or 1), 1)
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    finished = next((entry for entry in reversed(state.log_history) if "train_runtime" in entry), {})
    report = getattr(trainer, "data_reports", {}).get("train")
    device = str(args.device).split(":")[0]
    return {
        "optimizer steps": state.global_step,
        "rows per step": rows_per_step,
        "rows seen": state.global_step * rows_per_step,
        "epochs": round(float(state.epoch), 3) if state.epoch else None,
        "tokens per epoch (non-padding, after truncation)": report.num_tokens
        if report and not report.streamed
        else None,
        "input tokens seen": state.num_input_tokens_seen or None,
        "training seconds": training_seconds(finished["train_runtime"]) if "train_runtime" in finished else None,
        "devices": f"{processes} x {device}",
    }


def card_for_trainer(trainer: Any, folder: str | os.PathLike) -> str:
    """The card of the student a :class:`distill.Trainer` is saving to ``folder``."""
    from distill.models.merge import load_snippet

    model = trainer.model
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    parameters = sum(p.numel() for p in model.parameters())
    student = (f"`{name}`" if name else type(model).__name__) + f", {parameters:,} parameters"
    base_model = name if name and not Path(name).exists() and name.count("/") == 1 else None
    return model_card(
        student=student,
        teacher=describe_teacher(
            trainer.teachers if trainer.ensemble is not None else trainer.teacher,
            getattr(trainer, "_teacher_given", None),
        ),
        args=trainer.args,
        data=getattr(trainer, "_data_description", "unknown"),
        budget=trainer_budget(trainer),
        load_snippet=load_snippet(folder),
        base_model=base_model,
    )

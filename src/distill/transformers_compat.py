"""Every difference between transformers 4.57 (the floor) and 5.x that distill bridges, in one place.

distill is written against transformers 5.x. The floor, 4.57.6, differs in five places that change what a run
does, not just a name; each is bridged here, so that ``config.py`` and ``trainer.py`` read as 5.x code and the
day the floor moves to 5.x this module goes away whole. ``make test-min`` runs the fast suite on the floor and
``tests/test_versions.py`` checks each bridge's behaviour.

The five bridges (5.x behaviour, then 4.57's, then what bridges it):

- mixed precision: 5.x hands ``args.mixed_precision`` to the Accelerator; 4.57 reads an environment variable
  that any bf16 config in the process leaves set: :func:`point_mixed_precision_at`.
- warmup: 5.x's ``warmup_steps`` is a float, below 1 a fraction of the run; 4.57 wants int steps and the
  fraction in ``warmup_ratio``: :func:`move_warmup_fraction` (``DistillConfig`` declares the field as 5.x's
  float, so a 4.57 command line parses ``--warmup_steps 0.03`` too).
- checkpointing: 5.x is non-reentrant by default; 4.57 is reentrant, which breaks DDP + LoRA:
  :func:`default_to_non_reentrant`.
- a micro-batch's loss: 5.x keeps it as the trainer returns it (``loss_is_scaled_for_ga``); 4.57 divides it by
  the number of micro-batches: :data:`ENGINE_DIVIDES_BY_MICRO_BATCHES`.
- ``create_optimizer``: 5.x passes the prepared (e.g. FSDP2) model; 4.57 takes no argument:
  :func:`engine_optimizer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import transformers

# What the launcher (``accelerate launch --mixed_precision``) or the user set, read before any config writes it.
_LAUNCHER_MIXED_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")

# Each micro-batch's loss is its token-weighted share of the step already. transformers 5.x leaves it as is when
# the trainer says so (``loss_is_scaled_for_ga``); 4.57 has no such switch: its training_step divides every
# micro-batch's loss by the number of micro-batches (the model takes no ``num_items_in_batch``), so there
# compute_loss multiplies by that number first.
ENGINE_DIVIDES_BY_MICRO_BATCHES = not hasattr(transformers.Trainer, "loss_is_scaled_for_ga")


def point_mixed_precision_at(args: transformers.TrainingArguments) -> None:
    """On transformers 4.x, make ``ACCELERATE_MIXED_PRECISION`` say what ``args`` asks for (call before the
    ``Accelerator`` is built).

    transformers 5.x passes ``args.mixed_precision`` to the ``Accelerator`` itself. 4.57 tells it through that
    environment variable instead, written when *any* arguments are built and never reset: after one
    ``bf16=True`` config in a process (a ``--plan_only`` parse, a notebook cell), every later fp32 run trained
    under bf16 autocast without a word. Here each trainer gets its own arguments' setting.
    """
    if hasattr(args, "mixed_precision"):
        return  # transformers >= 5
    os.environ["ACCELERATE_MIXED_PRECISION"] = (
        "fp16" if args.fp16 else "bf16" if args.bf16 else _LAUNCHER_MIXED_PRECISION
    )


def move_warmup_fraction(args: transformers.TrainingArguments) -> None:
    """Give transformers 4.x the 5.x meaning of ``warmup_steps``: a fraction of the run below 1, else steps.

    transformers 5.0 folded ``warmup_ratio`` into ``warmup_steps`` (a float; < 1 is a fraction) and removed it;
    4.57 still wants an int there and the fraction in ``warmup_ratio`` (a float raises in its ``__post_init__``).
    The recipes and docs use the 5.x spelling (``warmup_steps=0.03``), so on 4.x it is moved where 4.x reads it.
    Call before ``TrainingArguments.__post_init__``.
    """
    if not hasattr(args, "warmup_ratio") or isinstance(args.warmup_steps, int):
        return  # transformers >= 5 (no warmup_ratio field), or already a 4.x-style step count
    if 0 < args.warmup_steps < 1:
        args.warmup_ratio, args.warmup_steps = args.warmup_steps, 0
    elif args.warmup_steps >= 1 and float(args.warmup_steps).is_integer():
        args.warmup_steps = int(args.warmup_steps)


def default_to_non_reentrant(args: transformers.TrainingArguments) -> None:
    """On transformers 4.x, checkpoint non-reentrantly unless the user chose: 5.x's default.

    4.x checkpoints reentrantly by default, which breaks DDP + LoRA ("mark a variable ready only once"); 5.x
    defaults to non-reentrant and renamed the field (``activation_checkpointing``; setting the old one there only
    warns), so 5.x is left alone. Call before ``TrainingArguments.__post_init__``.
    """
    if not hasattr(args, "activation_checkpointing") and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}


def engine_optimizer(create: Callable[..., Any], model: Any) -> Any:
    """``create()`` (the engine's ``create_optimizer``) called as the installed transformers takes it.

    5.x passes the accelerate-prepared (e.g. FSDP2) model; 4.57's ``create_optimizer()`` takes no argument and is
    never given one, so the model is forwarded only when there is one.
    """
    return create() if model is None else create(model)

"""distill: knowledge distillation of large language models.

``from distill import Trainer, DistillConfig`` is the usual entry point. The losses live in
:mod:`distill.losses`, teachers in :mod:`distill.teachers`, data handling in :mod:`distill.data`,
model loading in :mod:`distill.models`. Names are imported on first use, so ``import distill``
stays cheap (no transformers import until a trainer is asked for).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Trainer": "distill.trainer",
    "NonFiniteLossError": "distill.trainer",
    "TrainingPreempted": "distill.trainer",
    "DistillConfig": "distill.config",
    "ModelTeacher": "distill.teachers",
    "Teacher": "distill.teachers",
}

if TYPE_CHECKING:
    from distill.config import DistillConfig
    from distill.teachers import ModelTeacher, Teacher
    from distill.trainer import NonFiniteLossError, Trainer, TrainingPreempted

__all__ = ["DistillConfig", "ModelTeacher", "NonFiniteLossError", "Teacher", "Trainer", "TrainingPreempted"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")

"""The distillation trainer: a ``transformers.Trainer`` whose loss comes from a teacher."""

from distill.trainer.preemption import PREEMPTED_EXIT_CODE, SigtermCheckpoint, TrainingPreempted
from distill.trainer.trainer import NonFiniteLossError, Trainer

__all__ = ["PREEMPTED_EXIT_CODE", "NonFiniteLossError", "SigtermCheckpoint", "Trainer", "TrainingPreempted"]

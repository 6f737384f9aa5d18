"""Save a checkpoint and stop cleanly when the machine is being taken away (SIGTERM)."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

# 128 + SIGTERM: what a shell reports for a process stopped by SIGTERM; schedulers read it as "preempted".
PREEMPTED_EXIT_CODE = 143


class TrainingPreempted(SystemExit):
    """Raised by ``Trainer.train`` after a SIGTERM: a checkpoint was saved; resume from it."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SigtermCheckpoint(TrainerCallback):
    """On SIGTERM, let the current optimizer step finish, save a checkpoint, and stop training.

    Spot / preemptible machines and schedulers (Slurm, Kubernetes) send SIGTERM some seconds before
    killing a job. The handler only sets a flag; the step in flight completes, then the callback
    asks the trainer to save and stop. ``ranks_with`` (``flag -> [ranks where it is set]``, a collective)
    makes every process agree (a checkpoint needs all ranks) even when the signal reached only some of
    them; ``signalled_ranks`` then says which.
    """

    def __init__(self, ranks_with: Any = None) -> None:
        self.requested = False
        self.stopped_at_step: int | None = None
        self.signalled_ranks: list[int] = []
        self._ranks_with = ranks_with
        self._previous_handler: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # Signal handlers can only be installed from the main thread (not e.g. inside a notebook worker).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        requested = self.requested
        if self._ranks_with is not None:
            self.signalled_ranks = self._ranks_with(requested)
            requested = bool(self.signalled_ranks)
        if requested:
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

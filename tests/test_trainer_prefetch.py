"""Prefetching a remote teacher's targets: requested ahead on worker threads, training unchanged, failures resumable.

A stand-in for a server teacher (an in-process top-k teacher marked ``prefetchable``) keeps these tests
fast and offline; ``test_server_teacher.py`` runs the same paths against a real vLLM server.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import arithmetic_dataset, config, logged, state_vector
from transformers import TrainerCallback

from distill import Trainer
from distill.losses import SparseTargets
from distill.teachers import Teacher, TopKTeacher
from distill.teachers.server import ServerError
from distill.testing import tiny_teacher_student
from distill.trainer.prefetch import TargetPrefetcher

GRAD_ACCUMULATION = 2
DEPTH = 2


class RemoteLikeTeacher(Teacher):
    """Top-k targets computed in-process, but flagged as a remote teacher; records (thread, batch digest) per call."""

    prefetchable = True

    def __init__(self, model: torch.nn.Module, fail_on: str | None = None) -> None:
        self.inner = TopKTeacher(model, 8)
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()

    @property
    def vocab_rows(self) -> int:
        return self.inner.vocab_rows

    def targets(self, input_ids, attention_mask=None, position_ids=None) -> SparseTargets:
        with self._lock:  # one forward at a time: ModelTeacher's decoder hook is not thread-safe (a server is)
            digest = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()
            self.calls.append((threading.current_thread().name, digest))
            if digest == self.fail_on:
                raise ServerError("The teacher server at http://gpu-box:8000 did not answer after 5 attempts.")
            return self.inner.targets(input_ids, attention_mask, position_ids)


class RecordAhead(TrainerCallback):
    """How many micro-batches had their targets requested ahead when each optimizer step began."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.ahead: list[int] = []

    def on_step_begin(self, args, state, control, **kwargs):
        prefetcher = self.trainer._prefetcher
        self.ahead.append(-1 if prefetcher is None else prefetcher.ahead)


def _train(out: Path, tokenizer: Any, prefetch: int, fail_on: str | None = None, resume: bool = False):
    teacher_model, student = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher = RemoteLikeTeacher(teacher_model, fail_on)
    record = RecordAhead()
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(
            out,
            max_steps=6,
            gradient_accumulation_steps=GRAD_ACCUMULATION,
            teacher_prefetch=prefetch,
            loss="forward_kl",
            sparse_tail="bucket",
        ),  # fmt: skip
        train_dataset=arithmetic_dataset(20),  # 5 micro-batches an epoch: steps cross epoch ends
        processing_class=tokenizer,
        callbacks=[record],
    )
    record.trainer = trainer
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, teacher, record


def test_prefetched_targets_train_exactly_as_live_ones(tmp_path: Path, tokenizer: Any) -> None:
    live, live_teacher, live_record = _train(tmp_path / "live", tokenizer, prefetch=0)
    ahead, ahead_teacher, ahead_record = _train(tmp_path / "ahead", tokenizer, prefetch=DEPTH)
    # The same batches (two workers may swap the order of their requests), trained in the same order.
    assert sorted(d for _, d in ahead_teacher.calls) == sorted(d for _, d in live_teacher.calls)
    assert len(live_teacher.calls) == 10  # 2 epochs of 5 micro-batches; each epoch's last step has 1
    torch.testing.assert_close(logged(ahead, "loss"), logged(live, "loss"), atol=1e-6, rtol=0)
    torch.testing.assert_close(state_vector(ahead.model), state_vector(live.model), atol=1e-6, rtol=0)
    # Live: asked on the training thread. Prefetched: asked on worker threads, DEPTH batches ahead of each
    # step's micro-batches (fewer when the epoch's last batches have been handed out: 5 a epoch, 2 a step).
    assert {thread for thread, _ in live_teacher.calls} == {threading.main_thread().name}
    assert all(thread.startswith("distill-teacher-prefetch") for thread, _ in ahead_teacher.calls)
    assert live_record.ahead == [-1] * 6
    assert ahead_record.ahead == [2, 1, 0, 2, 1, 0]
    assert ahead._prefetcher is None  # shut down after training


def test_a_failing_teacher_checkpoints_and_the_run_resumes_exactly(tmp_path: Path, tokenizer: Any) -> None:
    reference, reference_teacher, _ = _train(tmp_path / "reference", tokenizer, prefetch=0)
    out = tmp_path / "run"
    # Micro-batch 7 is the second of step 4 (steps of 2, 2, 1 per 5-batch epoch): step 4 is never applied.
    with pytest.raises(ServerError, match="failed at optimizer step 4 after its retries") as error:
        _train(out, tokenizer, prefetch=DEPTH, fail_on=reference_teacher.calls[6][1])
    assert "checkpoint-3" in str(error.value) and "resume_from_checkpoint=True" in str(error.value)
    assert (out / "checkpoint-3").is_dir()
    resumed, teacher, _ = _train(out, tokenizer, prefetch=DEPTH, resume=True)
    # Only steps 4-6 (the second epoch) ask the teacher: nothing is repeated or skipped.
    assert sorted(d for _, d in teacher.calls) == sorted(d for _, d in reference_teacher.calls[5:])
    torch.testing.assert_close(state_vector(resumed.model), state_vector(reference.model), atol=1e-6, rtol=0)


def test_prefetching_is_off_where_batches_are_not_known_ahead(tmp_path: Path, tokenizer: Any) -> None:
    teacher_model, student = tiny_teacher_student(vocab_size=len(tokenizer))
    remote = RemoteLikeTeacher(teacher_model)
    for overrides, wanted in (({}, True), ({"teacher_prefetch": 0}, False), ({"lmbda": 0.5}, False)):
        trainer = Trainer(
            model=student, teacher=remote, args=config(tmp_path, loss="forward_kl", **overrides),
            train_dataset=arithmetic_dataset(8), processing_class=tokenizer,
        )  # fmt: skip
        assert (trainer._make_prefetcher() is not None) == wanted, overrides
    in_process = Trainer(
        model=student, teacher=teacher_model, args=config(tmp_path), train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )  # fmt: skip
    assert in_process._make_prefetcher() is None


def test_lookahead_hands_out_every_batch_once_in_order(tokenizer: Any) -> None:
    teacher_model, _ = tiny_teacher_student(vocab_size=len(tokenizer))
    teacher = RemoteLikeTeacher(teacher_model)
    batches = [
        {"input_ids": torch.full((2, 5), i), "attention_mask": torch.ones(2, 5, dtype=torch.long)} for i in range(7)
    ]
    prefetcher = TargetPrefetcher(teacher, depth=3)
    source = iter(batches)
    handed = []
    for _ in range(7):
        lookahead = prefetcher.wrap(source)
        assert prefetcher.wrap(source) is lookahead  # one lookahead per epoch iterator
        batch = next(lookahead)
        assert prefetcher.ahead == min(3, 6 - len(handed))
        handed.append(int(batch["input_ids"][0, 0]))
        assert batch["_teacher_targets"].result().topk_ids.shape == (2, 5, 8)
    assert handed == list(range(7))
    with pytest.raises(StopIteration):
        next(prefetcher.wrap(source))
    prefetcher.shutdown()
    with pytest.raises(ValueError, match="depth"):
        TargetPrefetcher(teacher, depth=0)

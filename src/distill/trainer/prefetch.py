"""Ask a remote teacher for the targets of the next micro-batches while the student trains on this one.

A :class:`~distill.teachers.ServerTeacher` spends its time waiting on the network and on the server's
GPUs, not on this process. The trainer wraps each epoch's batch iterator in a :class:`Lookahead`:
it keeps ``depth`` batches beyond the one handed out, each with a ``Future`` of its targets under
:data:`PREFETCHED_KEY`, so by the time the student reaches a batch its targets have usually arrived.
The order of batches, and so of training, is unchanged; only the requests move earlier.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch import Tensor

from distill.teachers import Teacher, TeacherTargets

__all__ = ["PREFETCHED_KEY", "Lookahead", "TargetPrefetcher"]

PREFETCHED_KEY = "_teacher_targets"


def _cpu(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach().cpu()


class Lookahead(Iterator[dict[str, Any]]):
    """An epoch's batches, each carrying a ``Future`` of its targets requested ``depth`` batches early."""

    def __init__(self, source: Iterator[dict[str, Any]], teacher: Teacher, pool: ThreadPoolExecutor, depth: int):
        self.source = source
        self._teacher = teacher
        self._pool = pool
        self._depth = depth
        self._ready: deque[dict[str, Any]] = deque()
        self._exhausted = False

    def _request(self, batch: dict[str, Any]) -> Future[TeacherTargets]:
        # CPU copies taken on this thread: the worker thread never touches the device's tensors or streams.
        ids, mask, positions = (_cpu(batch.get(key)) for key in ("input_ids", "attention_mask", "position_ids"))
        return self._pool.submit(self._teacher.targets, ids, mask, positions)

    def __next__(self) -> dict[str, Any]:
        while not self._exhausted and len(self._ready) <= self._depth:
            try:
                batch = next(self.source)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(batch, dict) and "input_ids" in batch:
                batch[PREFETCHED_KEY] = self._request(batch)
            self._ready.append(batch)
        if not self._ready:
            raise StopIteration
        return self._ready.popleft()

    @property
    def ahead(self) -> int:
        """Batches whose targets were requested but which were not handed out yet."""
        return len(self._ready)

    def cancel(self) -> None:
        """Drop the requests not started yet (the epoch ended early, or training stopped)."""
        for batch in self._ready:
            future = batch.get(PREFETCHED_KEY) if isinstance(batch, dict) else None
            if future is not None:
                future.cancel()
        self._ready.clear()


class TargetPrefetcher:
    """One :class:`Lookahead` per epoch iterator, sharing ``depth`` worker threads.

    Args:
        teacher: a teacher whose ``targets`` may run in another thread on CPU tensors
            (``teacher.prefetchable``); its answers come back on the CPU.
        depth: micro-batches requested beyond the one being trained (>= 1).
    """

    def __init__(self, teacher: Teacher, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}.")
        self.teacher = teacher
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="distill-teacher-prefetch")
        self._current: Lookahead | None = None

    def wrap(self, iterator: Iterator[dict[str, Any]]) -> Lookahead:
        """The lookahead over ``iterator`` (the same object for every call with the same iterator)."""
        if isinstance(iterator, Lookahead):
            return iterator
        if self._current is None or self._current.source is not iterator:
            self.close_epoch()
            self._current = Lookahead(iterator, self.teacher, self._pool, self.depth)
        return self._current

    @property
    def ahead(self) -> int:
        """Batches of the current epoch requested ahead of the one being trained."""
        return 0 if self._current is None else self._current.ahead

    def close_epoch(self) -> None:
        """Cancel the current epoch's pending requests."""
        if self._current is not None:
            self._current.cancel()
            self._current = None

    def shutdown(self) -> None:
        """Cancel pending requests and stop the worker threads (running requests finish in the background)."""
        self.close_epoch()
        self._pool.shutdown(wait=False, cancel_futures=True)

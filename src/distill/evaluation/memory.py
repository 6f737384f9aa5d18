"""Peak memory of this process since a starting point: CUDA's allocator, or resident memory on a CPU.

On CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. On a CPU (Linux): the peak
resident set size ``VmHWM`` of ``/proc/self/status``, reset to the current RSS by writing ``5`` to
``/proc/self/clear_refs`` (after ``malloc_trim`` returns freed heap to the system, so that a rise is
seen even where a warm-up run's freed memory is reused); elsewhere ``getrusage``'s lifetime peak
(which can only overstate). Used by
:func:`distill.evaluation.measure_speed` and by the benchmark scripts.
"""

from __future__ import annotations

import gc
import resource

import torch

__all__ = ["GIB", "PeakMemory", "status_bytes"]

GIB = 2**30


def status_bytes(key: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` / ``VmSize``-style field of ``/proc/self/status``, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release_freed_heap() -> None:
    # glibc keeps freed blocks (its mmap threshold grows after large frees), so memory a warm-up run freed would
    # be reused unseen by the RSS peak; malloc_trim hands it back first. A no-op where there is no glibc.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory since :meth:`start`, absolute and above the usage at :meth:`start`.

    Args:
        device: the device whose memory counts (``"cuda"``, ``"cuda:1"``, ``"cpu"``).

    Attributes:
        baseline: bytes in use at :meth:`start` (0 when the peak could not be reset).
        resettable: whether :meth:`start` could reset the peak, so that ``peak() - baseline`` is the rise since
            then (False on a CPU without ``/proc/self/clear_refs``: the peak is then the process's lifetime one).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline = 0
        self.resettable = False

    def start(self) -> None:
        """Free garbage, reset the peak to the current usage and record that usage as the baseline."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.resettable = True
            return
        _release_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.baseline = status_bytes("VmRSS")
            self.resettable = True
        except (OSError, KeyError):
            self.baseline = 0  # then the peak is the whole process's so far, which can only overstate
            self.resettable = False

    def peak(self) -> int | None:
        """Peak bytes since :meth:`start` (absolute: what was there before included), or None when unreadable."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            return status_bytes("VmHWM")
        except (OSError, KeyError):
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            return peak_kib * 1024 if peak_kib else None

    def extra_gib(self) -> float:
        """Peak since :meth:`start` minus the baseline, in GiB.

        Raises:
            RuntimeError: this platform reports no peak memory.
        """
        peak = self.peak()
        if peak is None:
            raise RuntimeError("This platform reports no peak memory for the process.")
        return (peak - self.baseline) / GIB

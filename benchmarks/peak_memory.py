"""Peak memory of the running process above a baseline, shared by the benchmark scripts.

CPU: resident set size from ``/proc/self/status``, with the peak (``VmHWM``) reset through
``/proc/self/clear_refs``. CUDA: the caching allocator's ``max_memory_allocated``.
"""

from __future__ import annotations

import gc

import torch

GIB = 2**30


def status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """Peak memory above a baseline: resident set size on the CPU, the caching allocator on CUDA."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline = 0

    def start(self) -> None:
        """Free garbage, reset the peak and record the baseline (call once the inputs exist)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.baseline = status_bytes("VmRSS")

    def peak(self) -> int:
        """Peak since :meth:`start`, in bytes (absolute)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return status_bytes("VmHWM")

    def extra_gib(self) -> float:
        """Peak since :meth:`start` minus the baseline, in GiB."""
        return (self.peak() - self.baseline) / GIB

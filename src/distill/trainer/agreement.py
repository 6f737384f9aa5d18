"""Ranks that agree: a failure on one process stops every process at the same micro-batch.

In a distributed run every process must enter the same collectives in the same order. A teacher server
that fails after its retries, or a non-finite loss, happens on one rank; if that rank alone saved a
checkpoint (a collective under FSDP / ZeRO-3) or raised, the others would wait in their next all-reduce
until the NCCL timeout. So each process reports its own problem (or none) at fixed points of the step,
every process learns which ranks failed and why, and all of them take the same way out: one collective
checkpoint, then the same error naming the failing ranks.

The cost is one tiny all-reduce per check (a host-device sync); the text of the problems travels only when
something failed.
"""

from __future__ import annotations

from typing import Any

import torch


class RankFailures:
    """Gathers each process's problem at an agreement point.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (``num_processes``, ``process_index``, ``device``).
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def gather(self, problem: str | None) -> dict[int, str]:
        """``{rank: problem}`` for every process that reports one; every process gets the same answer.

        Every process must call this at the same point of the step (it is a collective when
        ``num_processes > 1``).

        Args:
            problem: what went wrong on this process, or ``None``.
        """
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return {0: problem} if problem is not None else {}
        flag = torch.tensor([float(problem is not None)], device=accelerator.device)
        # host-device sync: one per agreement point
        if float(accelerator.reduce(flag, reduction="sum").item()) == 0:
            return {}
        from accelerate.utils import gather_object

        reports = gather_object([(accelerator.process_index, problem)])
        return {rank: text for rank, text in reports if text is not None}

    def ranks_with(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` is set (every process gets the same list); a collective."""
        return sorted(self.gather("set" if flag else None))


def describe(failures: dict[int, str]) -> str:
    """``"rank 1: <problem>"`` lines joined (ranks in order), for an error every process raises alike."""
    if len(failures) == 1:
        ((rank, problem),) = failures.items()
        return f"on rank {rank}: {problem}"
    return "on ranks " + "; ".join(f"{rank}: {problem}" for rank, problem in sorted(failures.items()))


__all__ = ["RankFailures", "describe"]

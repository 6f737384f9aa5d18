"""What to change when a run does not fit: each candidate change planned again, so its saving is computed.

Candidates: gradient checkpointing, a teacher cache, a 4-bit teacher, LoRA, QLoRA, pure bf16, 8-bit
AdamW, a per-device batch of 1 (with accumulation keeping the global batch), smaller loss chunks, the
fused loss, and more GPUs with FSDP2. When no single change on the same GPU is enough, the changes that
save the most are combined greedily until the run fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from distill.planning.memory import MemoryEstimate, estimate_memory
from distill.planning.setup import DEFAULT_QLORA_RANK, RunSetup

__all__ = ["COMBINED", "Suggestion", "suggestions"]

COMBINED = "together: "  # prefix of the suggestion that combines several changes


@dataclass(frozen=True)
class Suggestion:
    """One change to a run that does not fit, planned again.

    Attributes:
        change: what to change, in words (with the setting to use).
        saves_bytes: how much the peak goes down, in bytes per GPU.
        total_bytes: the new predicted peak, in bytes per GPU.
        fits: whether the run fits with this change.
        setup: the changed run.
        adds_gpus: the change is to spread the run over more GPUs.
    """

    change: str
    saves_bytes: float
    total_bytes: float
    fits: bool
    setup: RunSetup = field(repr=False, compare=False)
    adds_gpus: bool = False


class _Candidate(NamedTuple):
    """A change to try: its description, the function making it, and whether it adds GPUs."""

    change: str
    apply: Callable[[RunSetup], RunSetup]
    adds_gpus: bool = False


def _candidates(setup: RunSetup) -> list[_Candidate]:
    """Changes worth trying on ``setup``."""
    options: list[_Candidate] = []
    if not setup.gradient_checkpointing:
        options.append(_Candidate("enable gradient checkpointing", lambda s: replace(s, gradient_checkpointing=True)))
    if setup.teacher_in_process:
        options.append(
            _Candidate("use a teacher cache (distill cache, top-64)", lambda s: replace(s, teacher_mode="cache"))
        )
        if setup.teacher_mode != "4bit":
            options.append(
                _Candidate(
                    "load the teacher in 4-bit (teacher_quantization='4bit')",
                    lambda s: replace(s, teacher_mode="4bit"),
                )
            )
    if setup.training == "full":
        options.append(
            _Candidate(
                f"train LoRA adapters (r={DEFAULT_QLORA_RANK}) instead of every weight",
                lambda s: replace(s, lora_rank=DEFAULT_QLORA_RANK),
            )
        )
    if setup.training != "qlora":
        rank = setup.lora_rank or DEFAULT_QLORA_RANK
        options.append(
            _Candidate(f"QLoRA: 4-bit student with LoRA r={rank}", lambda s: replace(s, lora_rank=rank, qlora=True))
        )
    if setup.training == "full" and setup.precision == "mixed":
        options.append(
            _Candidate(
                "pure bf16 weights (no fp32 master copy: at small learning rates, e.g. 1e-5, Adam steps round away)",
                lambda s: replace(s, precision="bf16"),
            )
        )
    if not setup.eight_bit_optimizer:
        options.append(
            _Candidate("8-bit AdamW (optim='adamw_bnb_8bit')", lambda s: replace(s, optim="adamw_bnb_8bit"))
        )
    if setup.per_device_train_batch_size > 1:
        accumulation = setup.per_device_train_batch_size * setup.gradient_accumulation_steps
        options.append(
            _Candidate(
                f"per-device batch 1 with gradient accumulation {accumulation} (same global batch)",
                lambda s: replace(s, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation),
            )
        )
    if setup.loss_implementation == "dense":
        options.append(
            _Candidate(
                "the fused loss (loss_implementation='fused')", lambda s: replace(s, loss_implementation="fused")
            )
        )
    elif setup.chunk_size > 64:
        smaller = max(32, setup.chunk_size // 4)
        options.append(
            _Candidate(
                f"smaller loss chunks (loss_chunk_size={smaller})", lambda s: replace(s, loss_chunk_size=smaller)
            )
        )
    for gpus in (2, 4, 8):
        if gpus > setup.world_size:
            options.append(
                _Candidate(f"{gpus} GPUs with FSDP2 (student and teacher sharded)", _fsdp(gpus), adds_gpus=True)
            )
    return options


def _fsdp(gpus: int) -> Callable[[RunSetup], RunSetup]:
    def change(setup: RunSetup) -> RunSetup:
        return replace(setup, num_gpus=gpus, nodes=1, sharding="fsdp2", teacher_sharding="auto")

    return change


def suggestions(setup: RunSetup, memory: MemoryEstimate) -> tuple[Suggestion, ...]:
    """Every candidate change to ``setup`` planned again: those that fit first, then by bytes saved, then the
    combination of one-GPU changes that fits (when no single one does).

    Args:
        setup: the run that does not fit.
        memory: its estimate (the savings are differences from its peak, in bytes per GPU).
    """
    found: list[Suggestion] = []
    gpu_count_fits = False
    for candidate in _candidates(setup):
        if candidate.adds_gpus and gpu_count_fits:
            continue  # only the smallest GPU count that fits
        changed = candidate.apply(setup)
        total = estimate_memory(changed).total_bytes
        fits = total <= changed.gpu.memory_bytes
        gpu_count_fits = gpu_count_fits or (candidate.adds_gpus and fits)
        found.append(
            Suggestion(candidate.change, memory.total_bytes - total, total, fits, changed, candidate.adds_gpus)
        )
    found.sort(key=lambda s: (not s.fits, -s.saves_bytes))
    # When no one change fits on this GPU, say which changes together would (more GPUs are listed anyway).
    if not any(s.fits and not s.adds_gpus for s in found):
        combined = _combine(setup, memory)
        if combined is not None:
            found.append(combined)
    return tuple(found)


def _combine(setup: RunSetup, memory: MemoryEstimate) -> Suggestion | None:
    """Greedily apply the one-GPU change that saves the most until the run fits (None if it never does)."""
    current, current_total, names = setup, memory.total_bytes, []
    while True:
        tried = [
            (candidate, candidate.apply(current)) for candidate in _candidates(current) if not candidate.adds_gpus
        ]
        if not tried:
            return None
        candidate, changed = min(tried, key=lambda pair: estimate_memory(pair[1]).total_bytes)
        total = estimate_memory(changed).total_bytes
        if total >= current_total:
            return None
        current, current_total = changed, total
        names.append(candidate.change)
        if total <= current.gpu.memory_bytes:
            return Suggestion(COMBINED + "; ".join(names), memory.total_bytes - total, total, True, current)

"""`plan_run`: memory, speed and cost of a distillation run before launch, and what to change when it won't fit.

``plan_run`` takes the :class:`~distill.planning.setup.RunSetup` fields by name (``DistillConfig``'s names),
``plan_from_config`` reads a :class:`~distill.DistillConfig`;
both build a :class:`~distill.planning.setup.RunSetup` and return a :class:`Plan` (the changes that
would make a run fit come from :mod:`distill.planning.advice`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from distill.planning.advice import COMBINED, Suggestion, suggestions
from distill.planning.gpus import GPU, get_gpu
from distill.planning.memory import GIB, MemoryEstimate, estimate_memory
from distill.planning.models import ModelSpec, model_spec
from distill.planning.setup import CONFIG_FIELDS, RunSetup
from distill.planning.throughput import Cost, Throughput, estimate_cost, estimate_throughput

if TYPE_CHECKING:
    from distill.config import DistillConfig

__all__ = ["Plan", "plan", "plan_from_config", "plan_run"]

ModelSource = str | os.PathLike | Mapping[str, Any] | ModelSpec


@dataclass(frozen=True)
class Plan:
    """The prediction for one run on one GPU type.

    Attributes:
        setup: the run.
        memory: per-GPU memory items and peak.
        throughput: FLOPs per token, tokens/s, seconds per step.
        cost: hours and dollars for the token budget, or None without one.
        suggestions: when it does not fit, changes that were planned again (best first); else empty.
    """

    setup: RunSetup
    memory: MemoryEstimate
    throughput: Throughput
    cost: Cost | None
    suggestions: tuple[Suggestion, ...] = ()

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within the GPU's memory."""
        return self.memory.fits

    @property
    def message(self) -> str:
        """A sentence or two: it fits (with the headroom), or what takes the memory and what to change."""
        memory, gpu = self.memory, self.setup.gpu
        needed = f"{memory.total_bytes / GIB:.1f} GiB of {gpu.name}'s {gpu.memory_gib:.1f} GiB"
        if self.fits:
            tight = " (tight: allocator fragmentation can take 5-10% more)" if memory.utilisation > 0.9 else ""
            return f"Fits: {needed} per GPU{tight}."
        biggest = memory.biggest
        lines = [
            f"Does not fit: needs {needed} per GPU. Biggest item: {biggest.name} ({biggest.gib:.1f} GiB, "
            f"{biggest.detail})."
        ]
        combined = [s for s in self.suggestions if s.change.startswith(COMBINED)]
        single = [s for s in self.suggestions if not s.change.startswith(COMBINED)]
        enough = [s for s in single if s.fits]
        helps = [s for s in single if not s.fits and s.saves_bytes > 0]
        if enough:
            lines.append("Each of these makes it fit:")
            lines += [f"  - {s.change}: saves {s.saves_bytes / GIB:.1f} GiB" for s in enough]
        if helps:
            lines.append("These help but are not enough alone:" if enough else "Changes that help:")
            lines += [f"  - {s.change}: saves {s.saves_bytes / GIB:.1f} GiB" for s in helps]
        for suggestion in combined:
            changes = suggestion.change.removeprefix(COMBINED)
            lines.append(
                f"Together these make it fit on one GPU: {changes} (saves {suggestion.saves_bytes / GIB:.1f} GiB)."
            )
        if not enough and not combined:
            lines.append("Nothing planned here makes it fit: use a bigger GPU, a smaller model or shorter sequences.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (bytes in bytes, times in seconds)."""
        setup = asdict(self.setup)
        setup["gpu"] = self.setup.gpu.name
        setup["student"] = self.setup.student.name
        setup["teacher"] = None if self.setup.teacher is None else self.setup.teacher.name
        setup["chunk_size"] = self.setup.chunk_size  # the fused loss's chunk, resolved from distill's default
        return {
            "setup": setup,
            "fits": self.fits,
            "memory": {
                "total_bytes": self.memory.total_bytes,
                "capacity_bytes": self.memory.capacity_bytes,
                "peak_phase": self.memory.peak_phase,
                "biggest": self.memory.biggest.name,
                "items": [asdict(item) for item in self.memory.items],
            },
            "throughput": {**asdict(self.throughput), "flops_per_token": self.throughput.flops_per_token},
            "cost": None if self.cost is None else asdict(self.cost),
            "suggestions": [
                {name: getattr(s, name) for name in ("change", "saves_bytes", "total_bytes", "fits", "adds_gpus")}
                for s in self.suggestions
            ],
            "message": self.message,
        }


def plan(setup: RunSetup, *, suggest: bool = True) -> Plan:
    """Plan an already-built :class:`RunSetup`: memory, throughput, cost and (if it does not fit) suggestions."""
    memory = estimate_memory(setup)
    throughput = estimate_throughput(setup)
    changes = suggestions(setup, memory) if suggest and not memory.fits else ()
    return Plan(setup, memory, throughput, estimate_cost(setup, throughput), changes)


def plan_run(
    student: ModelSource,
    teacher: ModelSource | None = None,
    *,
    gpu: str | GPU = "H100",
    catalogue: Mapping[str, GPU] | None = None,
    suggest: bool = True,
    **settings: Any,
) -> Plan:
    """Predict whether a distillation run fits on ``gpu``, how fast it trains and what its token budget costs.

    Args:
        student, teacher: a catalogue name (``"Qwen/Qwen2.5-Coder-14B"``), a ``config.json`` path or
            folder, a parsed config dict, or a :class:`ModelSpec`. ``teacher`` may be ``None`` with
            ``teacher_mode`` ``"cache"``/``"server"``.
        gpu: a catalogue GPU name (``"H100"``, ``"A100-40GB"``, ...), ``"cpu"``, or a :class:`GPU`.
        catalogue: GPUs to look ``gpu`` up in (e.g. from :func:`distill.planning.with_prices`).
        suggest: plan the changes that would make a run that does not fit fit.
        **settings: any other :class:`RunSetup` field by name, with ``DistillConfig``'s names where it has
            the knob: ``max_length=1024``, ``per_device_train_batch_size=4``, ``loss="skl"``, ``lmbda=0.5``,
            ``num_gpus=8`` (per node), ``nodes=2``, ``sharding="fsdp2"``, ``lora_rank=16``, ``tokens=50e6``, ...

    Returns:
        A :class:`Plan`; ``plan.fits``, ``plan.message``, ``plan.memory.items``, ``plan.throughput``,
        ``plan.cost``.

    Raises:
        TypeError: a setting that is not a :class:`RunSetup` field (its message lists them).
        ValueError: a value out of range, an unknown divergence, an impossible combination.
    """
    known = {spec.name for spec in fields(RunSetup)} - {"student", "teacher", "gpu"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"plan_run() got unknown settings {unknown}; RunSetup's fields are {sorted(known)}.")
    setup = RunSetup(
        student=model_spec(student),
        teacher=None if teacher is None else model_spec(teacher),
        gpu=gpu if isinstance(gpu, GPU) else get_gpu(gpu, catalogue),
        **settings,
    )
    return plan(setup, suggest=suggest)


def _precision_of(config: DistillConfig) -> str:
    """``mixed`` for an fp32 student with bf16/fp16 autocast, ``fp32`` without, ``bf16`` for a 16-bit student.

    ``student_dtype="auto"`` keeps the checkpoint's dtype, which is bf16 for the models in the catalogue.
    """
    if config.student_dtype in ("fp32", "float32", "float"):
        return "mixed" if (config.bf16 or config.fp16) else "fp32"
    if config.use_cpu and config.student_dtype == "auto":
        return "fp32"
    return "bf16"


def _teacher_mode_of(config: DistillConfig) -> str:
    if config.teacher_quantization != "none":
        return config.teacher_quantization
    dtype = config.teacher_dtype
    if dtype in ("fp32", "float32", "float"):
        return "fp32"
    return "fp16" if dtype in ("fp16", "float16", "half") else "bf16"


def _sharding_of(config: DistillConfig, num_gpus: int) -> str:
    if num_gpus == 1:
        return "none"
    if config.fsdp:
        return "fsdp2"
    if config.deepspeed:
        return "zero3"  # the ZeRO stage lives in the DeepSpeed JSON; distill's recipe uses stage 3
    return "ddp"


def _hidden_layers(config: DistillConfig, student: ModelSource) -> int:
    """Mapped layer pairs of the hidden-state loss: 0 when it is off, every student layer for ``auto``."""
    from distill.config import parse_layer_map

    if config.hidden_loss_weight == 0:
        return 0
    if config.hidden_layer_map == "auto":
        return model_spec(student).num_layers  # auto maps every student layer (record or evenly spaced)
    return len(parse_layer_map(config.hidden_layer_map))


def plan_from_config(
    config: DistillConfig,
    student: ModelSource,
    teacher: ModelSource | None = None,
    *,
    gpu: str | GPU = "H100",
    num_gpus: int = 1,
    **overrides: Any,
) -> Plan:
    """:func:`plan_run` with the settings a :class:`~distill.DistillConfig` already holds.

    Copied by name (:data:`~distill.planning.setup.CONFIG_FIELDS`, the ``RunSetup`` fields that are
    ``DistillConfig`` fields too): ``max_length``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``gradient_checkpointing``, ``loss_implementation``, ``loss_chunk_size``,
    ``loss``, ``teacher_sharding``, ``optim``, ``lmbda``, ``seq_kd``, ``max_new_tokens``, ``num_train_epochs``,
    ``hidden_projection``. Derived, because the config spreads them over several fields: ``teacher_mode``
    (``teacher_quantization`` / ``teacher_dtype``), ``precision`` (``student_dtype`` with ``bf16``/``fp16``),
    ``sharding`` (``fsdp``/``deepspeed``, when ``num_gpus > 1``) and ``hidden_layers`` (``hidden_loss_weight``
    / ``hidden_layer_map``; ``auto`` maps every student layer; a pruned student's channel selection is not seen
    here: pass ``hidden_projection="select"``). The LoRA config is not part of a DistillConfig: pass
    ``lora_rank=`` / ``qlora=`` (and ``tokens=`` for a cost) in ``overrides``, which also override anything
    read from ``config``.

    Returns:
        The :class:`Plan`.
    """
    settings: dict[str, Any] = {name: getattr(config, name) for name in CONFIG_FIELDS}
    # TrainingArguments turns `optim` into an OptimizerNames enum whose value is the name users type.
    settings["optim"] = str(getattr(config.optim, "value", config.optim)).lower()
    settings["num_train_epochs"] = float(config.num_train_epochs)
    settings["gradient_checkpointing"] = bool(config.gradient_checkpointing)
    settings.update(
        teacher_mode=_teacher_mode_of(config),
        precision=_precision_of(config),
        sharding=_sharding_of(config, num_gpus * int(overrides.get("nodes", 1))),
        hidden_layers=_hidden_layers(config, student),
    )
    settings.update(overrides)
    return plan_run(student, teacher, gpu=gpu, num_gpus=num_gpus, **settings)

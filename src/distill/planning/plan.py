"""`plan_run`: memory, speed and cost of a distillation run before launch, and what to change when it won't fit.

``plan_run`` takes explicit arguments, ``plan_from_config`` reads a :class:`~distill.DistillConfig`;
both build a :class:`~distill.planning.setup.RunSetup` and return a :class:`Plan` (the changes that
would make a run fit come from :mod:`distill.planning.advice`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from distill.planning.advice import COMBINED, Suggestion, suggestions
from distill.planning.gpus import GPU, get_gpu
from distill.planning.memory import GIB, MemoryEstimate, estimate_memory
from distill.planning.models import ModelSpec, model_spec
from distill.planning.setup import RunSetup
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
    num_gpus: int = 1,
    seq_len: int = 2048,
    per_device_batch: int = 1,
    gradient_accumulation_steps: int = 1,
    lora_rank: int | None = None,
    qlora: bool = False,
    teacher_mode: str = "bf16",
    gradient_checkpointing: bool = False,
    loss_chunk_size: int | None = None,
    loss_impl: str = "fused",
    divergence: str = "jsd",
    sharding: str = "none",
    shard_teacher: bool | None = None,
    optimizer: str = "adamw",
    precision: str = "mixed",
    tokens: float | None = None,
    epochs: float = 1.0,
    mfu: float | None = None,
    on_policy_fraction: float = 0.0,
    max_new_tokens: int = 128,
    padded: bool | None = None,
    hidden_layers: int = 0,
    hidden_projection: str = "auto",
    catalogue: Mapping[str, GPU] | None = None,
    suggest: bool = True,
) -> Plan:
    """Predict whether a distillation run fits on ``gpu``, how fast it trains and what its token budget costs.

    Args:
        student, teacher: a catalogue name (``"Qwen/Qwen2.5-Coder-14B"``), a ``config.json`` path or
            folder, a parsed config dict, or a :class:`ModelSpec`. ``teacher`` may be ``None`` with
            ``teacher_mode`` ``"cache"``/``"server"``.
        gpu: a catalogue GPU name (``"H100"``, ``"A100-40GB"``, ...), ``"cpu"``, or a :class:`GPU`.
        num_gpus: GPUs (one process each).
        seq_len: tokens per row. per_device_batch: rows per micro-batch per GPU.
        gradient_accumulation_steps: micro-batches per optimizer step.
        lora_rank: LoRA rank on all projections, or ``None`` for a full fine-tune.
        qlora: 4-bit NF4 student base (LoRA rank 16 unless given).
        teacher_mode: ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"8bit"``, ``"4bit"``, ``"cache"`` or ``"server"``.
        gradient_checkpointing: recompute layers in the backward.
        loss_chunk_size: fused-loss tokens per chunk (``None``: distill's default). loss_impl: ``"fused"``/``"dense"``.
        divergence: distill's ``loss`` (``"jsd"``, ``"forward_kl"``, ...).
        sharding: ``"none"``, ``"ddp"``, ``"fsdp2"`` or ``"zero3"``; shard_teacher: see :class:`RunSetup`.
        optimizer: ``"adamw"`` or ``"adamw_8bit"``. precision: ``"mixed"``, ``"bf16"`` or ``"fp32"``.
        tokens: training tokens per epoch (e.g. ``50e6``), for time and cost; epochs: passes over them.
        mfu: one utilisation for every part, overriding the defaults.
        on_policy_fraction, max_new_tokens: on-policy steps (distill's ``lmbda``) and their completion length.
        padded: whether batches are padded (default: when ``per_device_batch > 1``).
        hidden_layers, hidden_projection: the intermediate-layer loss's mapped layer pairs (0: off) and
            projection (see :class:`RunSetup`).
        catalogue: GPUs to look ``gpu`` up in (e.g. from :func:`distill.planning.with_prices`).
        suggest: plan the changes that would make a run that does not fit fit.

    Returns:
        A :class:`Plan`; ``plan.fits``, ``plan.message``, ``plan.memory.items``, ``plan.throughput``,
        ``plan.cost``.
    """
    setup = RunSetup(
        student=model_spec(student),
        teacher=None if teacher is None else model_spec(teacher),
        gpu=gpu if isinstance(gpu, GPU) else get_gpu(gpu, catalogue),
        num_gpus=num_gpus,
        seq_len=seq_len,
        per_device_batch=per_device_batch,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lora_rank=lora_rank,
        qlora=qlora,
        teacher_mode=teacher_mode,  # type: ignore[arg-type]
        gradient_checkpointing=gradient_checkpointing,
        loss_impl=loss_impl,  # type: ignore[arg-type]
        loss_chunk_size=loss_chunk_size,
        divergence=divergence,
        sharding=sharding,  # type: ignore[arg-type]
        shard_teacher=shard_teacher,
        optimizer=optimizer,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        padded=padded,
        mfu=mfu,
        tokens=tokens,
        epochs=epochs,
        on_policy_fraction=on_policy_fraction,
        max_new_tokens=max_new_tokens,
        hidden_layers=hidden_layers,
        hidden_projection=hidden_projection,
    )
    return plan(setup, suggest=suggest)


_EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit")


def _precision_of(config: DistillConfig) -> str:
    """``mixed`` for an fp32 student with bf16/fp16 autocast, ``fp32`` without, ``bf16`` for a 16-bit student.

    ``student_dtype="auto"`` keeps the checkpoint's dtype, which is bf16 for the models in the catalogue.
    """
    if config.student_dtype in ("fp32", "float32"):
        return "mixed" if (config.bf16 or config.fp16) else "fp32"
    if config.use_cpu and config.student_dtype == "auto":
        return "fp32"
    return "bf16"


def _teacher_mode_of(config: DistillConfig) -> str:
    if config.teacher_quantization != "none":
        return config.teacher_quantization
    dtype = config.teacher_dtype
    if dtype in ("fp32", "float32"):
        return "fp32"
    return "fp16" if dtype in ("fp16", "float16") else "bf16"


def _optimizer_name(config: DistillConfig) -> str:
    # TrainingArguments turns `optim` into an OptimizerNames enum whose value is the name users type.
    return str(getattr(config.optim, "value", config.optim)).lower()


def _sharding_of(config: DistillConfig, num_gpus: int) -> str:
    if num_gpus == 1:
        return "none"
    if config.fsdp:
        return "fsdp2"
    if config.deepspeed:
        return "zero3"  # the ZeRO stage lives in the DeepSpeed JSON; distill's recipe uses stage 3
    return "ddp"


def _hidden_settings(config: DistillConfig, student: ModelSource) -> dict[str, Any]:
    """``hidden_layers`` / ``hidden_projection`` of :func:`plan_run` from the config's hidden-state fields."""
    from distill.config import parse_layer_map

    if config.hidden_layer_map == "auto":
        layers = model_spec(student).num_layers  # auto maps every student layer (record or evenly spaced)
    else:
        layers = len(parse_layer_map(config.hidden_layer_map))
    projection = {"none": "identity"}.get(config.hidden_projection, config.hidden_projection)
    return {"hidden_layers": layers, "hidden_projection": projection}


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

    Read from ``config``: ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
    ``max_length`` (as ``seq_len``), ``gradient_checkpointing``, ``loss_chunk_size``,
    ``loss_implementation``, ``loss`` (divergence), ``teacher_quantization`` / ``teacher_dtype``
    (teacher mode), ``student_dtype`` with ``bf16``/``fp16`` (precision), ``optim`` (8-bit AdamW
    variants), ``lmbda`` and ``max_new_tokens`` (on-policy), ``num_train_epochs``, ``teacher_sharding``
    and ``fsdp``/``deepspeed`` (sharding, when ``num_gpus > 1``), ``hidden_loss_weight`` /
    ``hidden_layer_map`` / ``hidden_projection`` (the intermediate-layer loss; ``auto`` maps every student
    layer; a pruned student's channel selection is not seen here: pass ``hidden_projection="select"``).
    The LoRA config is not part of a
    DistillConfig: pass ``lora_rank=`` / ``qlora=`` (and ``tokens=`` for a cost) in ``overrides``,
    which also override anything read from ``config``.

    Returns:
        The :class:`Plan`.
    """
    teacher_sharding = {"fsdp": True, "none": False}.get(config.teacher_sharding)
    settings: dict[str, Any] = {
        "seq_len": config.max_length,
        "per_device_batch": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "loss_chunk_size": config.loss_chunk_size,
        "loss_impl": config.loss_implementation,
        "divergence": config.loss,
        "teacher_mode": _teacher_mode_of(config),
        "precision": _precision_of(config),
        "optimizer": "adamw_8bit" if _optimizer_name(config) in _EIGHT_BIT_OPTIMIZERS else "adamw",
        "on_policy_fraction": config.lmbda,
        "max_new_tokens": config.max_new_tokens,
        "epochs": float(config.num_train_epochs),
        "sharding": _sharding_of(config, num_gpus),
        "shard_teacher": teacher_sharding,
    }
    if config.hidden_loss_weight > 0:
        settings.update(_hidden_settings(config, student))
    settings.update(overrides)
    return plan_run(student, teacher, gpu=gpu, num_gpus=num_gpus, **settings)

"""`RunSetup`: everything the planner needs to know about one distillation run, checked once.

The other planning modules read a :class:`RunSetup` and never re-validate it. Suggestions for a run
that does not fit are made by copying it with one field changed (``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distill.planning.gpus import GPU
from distill.planning.models import ModelSpec

__all__ = [
    "IN_PROCESS_TEACHERS",
    "OPTIMIZERS",
    "PRECISIONS",
    "SHARDINGS",
    "TEACHER_MODES",
    "RunSetup",
]

TeacherMode = Literal["fp32", "bf16", "fp16", "8bit", "4bit", "cache", "server"]
Sharding = Literal["none", "ddp", "fsdp2", "zero3"]
Precision = Literal["mixed", "bf16", "fp32"]
Optimizer = Literal["adamw", "adamw_8bit"]

TEACHER_MODES: tuple[str, ...] = ("fp32", "bf16", "fp16", "8bit", "4bit", "cache", "server")
IN_PROCESS_TEACHERS: tuple[str, ...] = ("fp32", "bf16", "fp16", "8bit", "4bit")
SHARDINGS: tuple[str, ...] = ("none", "ddp", "fsdp2", "zero3")
PRECISIONS: tuple[str, ...] = ("mixed", "bf16", "fp32")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit")
LOSS_IMPLEMENTATIONS: tuple[str, ...] = ("fused", "dense")
DEFAULT_QLORA_RANK = 16


@dataclass(frozen=True)
class RunSetup:
    """One distillation run as the planner sees it.

    Attributes:
        student: the student's shape.
        teacher: the teacher's shape; may be ``None`` for a ``cache`` or ``server`` teacher.
        gpu: the device every process runs on.
        num_gpus: processes (one GPU each).
        seq_len: tokens per row (``max_length``; rows are assumed full).
        per_device_batch: rows per micro-batch per GPU.
        gradient_accumulation_steps: micro-batches per optimizer step.
        lora_rank: LoRA rank on all 7 projections of every layer, or ``None`` for a full fine-tune.
        qlora: the student's projections in 4-bit NF4 (needs ``lora_rank``).
        teacher_mode: ``fp32``/``bf16``/``fp16``/``8bit``/``4bit`` (in-process weights), ``cache`` (a
            top-k cache read from disk) or ``server`` (another machine); the last two cost this GPU no
            teacher weights.
        gradient_checkpointing: recompute each layer in the backward.
        loss_impl: ``fused`` (chunked over tokens, no ``[tokens, V]`` logits) or ``dense``.
        loss_chunk_size: tokens per fused-loss chunk; ``None``: distill's default for the vocabulary
            and device (:func:`distill.losses.fused.default_chunk_size`).
        divergence: the KD divergence (its temporaries differ a little).
        sharding: ``none`` (one GPU, or nothing distributed), ``ddp``, ``fsdp2`` or ``zero3``.
        shard_teacher: shard an in-process teacher over the GPUs (FSDP2); ``None``: when the student
            is sharded, as distill's ``teacher_sharding="auto"`` does.
        optimizer: ``adamw`` (torch, two states in the parameter dtype) or ``adamw_8bit`` (bitsandbytes).
        precision: ``mixed`` (fp32 weights and optimizer, bf16 autocast compute), ``bf16`` (weights,
            gradients and optimizer states all bf16, as ``transformers.Trainer`` trains a model loaded
            in bf16) or ``fp32`` (no 16-bit anywhere, e.g. a CPU). LoRA bases are kept in bf16 under
            ``mixed`` too; adapters are fp32 in every mode (peft's default).
        padded: rows of unequal length are padded, so attention gets a mask (kept per layer for the
            backward) and grouped-query keys/values are repeated; ``None``: when ``per_device_batch > 1``.
        cache_top_k: entries per token of a ``cache``/``server`` teacher's sparse targets.
        mfu: model FLOPs utilisation for every part; ``None``: per-part defaults (see ``throughput``).
        tokens: training tokens per epoch (the token budget), or ``None`` for no cost estimate.
        epochs: passes over ``tokens``.
        on_policy_fraction: share of steps whose completions the student generates (distill's ``lmbda``).
        max_new_tokens: tokens generated per completion on those steps.
        hidden_layers: mapped layer pairs of the intermediate-layer (hidden-state) loss; 0: off.
        hidden_projection: how student states meet the teacher's width: ``learned`` (a linear map
            per pair, trained), ``select`` (a pruned student's kept channels; no parameters),
            ``identity``, or ``auto`` (learned when the widths differ, else identity).
    """

    student: ModelSpec
    teacher: ModelSpec | None
    gpu: GPU
    num_gpus: int = 1
    seq_len: int = 2048
    per_device_batch: int = 1
    gradient_accumulation_steps: int = 1
    lora_rank: int | None = None
    qlora: bool = False
    teacher_mode: TeacherMode = "bf16"
    gradient_checkpointing: bool = False
    loss_impl: Literal["fused", "dense"] = "fused"
    loss_chunk_size: int | None = None
    divergence: str = "jsd"
    sharding: Sharding = "none"
    shard_teacher: bool | None = None
    optimizer: Optimizer = "adamw"
    precision: Precision = "mixed"
    padded: bool | None = None
    cache_top_k: int = 64
    mfu: float | None = None
    tokens: float | None = None
    epochs: float = 1.0
    on_policy_fraction: float = 0.0
    max_new_tokens: int = 128
    hidden_layers: int = 0
    hidden_projection: str = "auto"

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        if self.qlora and self.lora_rank is None:
            object.__setattr__(self, "lora_rank", DEFAULT_QLORA_RANK)
        if self.teacher is None and self.teacher_mode in IN_PROCESS_TEACHERS:
            raise ValueError(f"teacher_mode={self.teacher_mode!r} runs the teacher here: give its model (teacher=).")
        if self.sharding == "zero3" and self.loss_impl == "fused":
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the student's LM head, which distill's fused loss reads directly (the "
                "trainer refuses it). Plan with loss_impl='dense' for ZeRO-3, or use sharding='fsdp2'."
            )

    def _check_choices(self) -> None:
        choices = {
            "teacher_mode": TEACHER_MODES,
            "sharding": SHARDINGS,
            "precision": PRECISIONS,
            "optimizer": OPTIMIZERS,
            "loss_impl": LOSS_IMPLEMENTATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")

    def _check_numbers(self) -> None:
        for name in ("num_gpus", "seq_len", "per_device_batch", "gradient_accumulation_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 (or None for a full fine-tune); got {self.lora_rank}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1 token; got {self.loss_chunk_size}.")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ValueError(f"mfu is a fraction of the peak FLOP rate, in (0, 1]; got {self.mfu}.")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"tokens must be > 0; got {self.tokens}.")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {self.epochs}.")
        if self.hidden_layers < 0:
            raise ValueError(f"hidden_layers is a number of mapped layer pairs, >= 0; got {self.hidden_layers}.")
        if self.hidden_projection not in ("auto", "learned", "select", "identity"):
            raise ValueError(
                f"hidden_projection must be auto, learned, select or identity; got {self.hidden_projection!r}."
            )
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"on_policy_fraction must be in [0, 1]; got {self.on_policy_fraction}.")

    # ---- derived quantities -------------------------------------------------------------------------

    @property
    def training(self) -> Literal["full", "lora", "qlora"]:
        """What is trained: every weight (``full``), LoRA adapters on a 16/32-bit base, or on a 4-bit base."""
        if self.lora_rank is None:
            return "full"
        return "qlora" if self.qlora else "lora"

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of matmul inputs and outputs: 2 under bf16 compute, 4 in fp32."""
        return 4 if self.precision == "fp32" else 2

    @property
    def tokens_per_micro_batch(self) -> int:
        """Tokens one GPU processes per forward/backward, ``per_device_batch * seq_len``."""
        return self.per_device_batch * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all GPUs."""
        return self.tokens_per_micro_batch * self.gradient_accumulation_steps * self.num_gpus

    @property
    def vocab(self) -> int:
        """Vocabulary rows the loss compares: the smaller head (distill uses the rows both share)."""
        if self.teacher is None:
            return self.student.vocab_size
        return min(self.student.vocab_size, self.teacher.vocab_size)

    @property
    def chunk_size(self) -> int:
        """Tokens per fused-loss chunk (explicit, or distill's default for this vocabulary and device)."""
        if self.loss_chunk_size is not None:
            return self.loss_chunk_size
        from distill.losses.fused import default_chunk_size

        return default_chunk_size(self.vocab, "cuda" if self.gpu.cuda else "cpu")

    @property
    def is_padded(self) -> bool:
        """Whether attention gets a padding mask (see ``padded``)."""
        return self.per_device_batch > 1 if self.padded is None else self.padded

    @property
    def learned_hidden_projection(self) -> bool:
        """Whether the hidden-state loss trains a linear map per mapped layer (student width -> teacher's)."""
        if self.hidden_layers == 0 or self.teacher is None:
            return False
        if self.hidden_projection == "auto":
            return self.student.hidden_size != self.teacher.hidden_size
        return self.hidden_projection == "learned"

    @property
    def teacher_in_process(self) -> bool:
        """Whether the teacher's weights live on this GPU."""
        return self.teacher_mode in IN_PROCESS_TEACHERS

    @property
    def student_sharded(self) -> bool:
        """Whether the student's weights, gradients and optimizer states are split over the GPUs."""
        return self.sharding in ("fsdp2", "zero3") and self.num_gpus > 1

    @property
    def teacher_sharded(self) -> bool:
        """Whether an in-process teacher's weights are split over the GPUs (FSDP2)."""
        wanted = self.student_sharded if self.shard_teacher is None else self.shard_teacher
        return wanted and self.num_gpus > 1 and self.teacher_in_process

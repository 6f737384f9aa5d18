"""`RunSetup`: everything the planner needs to know about one distillation run, declared once and checked once.

Each field is declared here once, with its help: the ``distill plan`` flags are generated from these
declarations (:mod:`distill.planning.cli`), and the fields a :class:`~distill.DistillConfig` also holds
carry its name and its values (``max_length``, ``per_device_train_batch_size``, ``loss``, ``lmbda``, ...),
so :func:`~distill.planning.plan_from_config` copies them across by name. The divergence name is
canonicalised by the losses layer (:class:`distill.losses.Divergence`), the one place that knows its aliases.

The other planning modules read a :class:`RunSetup` and never re-validate it. Suggestions for a run
that does not fit are made by copying it with one field changed (``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal

from distill.checks import check_bool, check_float, check_int
from distill.planning.gpus import GPU
from distill.planning.models import ModelSpec

__all__ = [
    "CONFIG_FIELDS",
    "EIGHT_BIT_OPTIMIZERS",
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

TEACHER_MODES: tuple[str, ...] = ("fp32", "bf16", "fp16", "8bit", "4bit", "cache", "server")
IN_PROCESS_TEACHERS: tuple[str, ...] = ("fp32", "bf16", "fp16", "8bit", "4bit")
SHARDINGS: tuple[str, ...] = ("none", "ddp", "fsdp2", "zero3")
PRECISIONS: tuple[str, ...] = ("mixed", "bf16", "fp32")
# TrainingArguments' `optim` names the planner can size: AdamW with two states in the parameter's dtype,
# or bitsandbytes' 8-bit AdamW (one byte per state).
EIGHT_BIT_OPTIMIZERS: tuple[str, ...] = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
OPTIMIZERS: tuple[str, ...] = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", *EIGHT_BIT_OPTIMIZERS)
LOSS_IMPLEMENTATIONS: tuple[str, ...] = ("fused", "dense")
TEACHER_SHARDINGS: tuple[str, ...] = ("auto", "none", "fsdp")
HIDDEN_PROJECTIONS: tuple[str, ...] = ("auto", "learned", "none", "select")
DEFAULT_QLORA_RANK = 16

# Fields that DistillConfig holds under the same name and with the same values: plan_from_config copies them.
CONFIG_FIELDS: tuple[str, ...] = (
    "max_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "loss_implementation",
    "loss_chunk_size",
    "loss",
    "teacher_sharding",
    "optim",
    "lmbda",
    "seq_kd",
    "max_new_tokens",
    "num_train_epochs",
    "hidden_projection",
)


def _knob(default: Any, help: str, **check: Any) -> Any:
    """A field with its help, and its values: ``choices=``, or ``check=`` ``"int"``/``"float"``/``"bool"`` with bounds
    (``minimum``, ``maximum``, ``exclusive_minimum``, as :func:`distill.checks.check_int` / ``check_float`` take).

    The same metadata builds the ``distill plan`` flag (:mod:`distill.planning.cli`); ``RunSetup``'s own
    checks read the bounds too, so a flag and a keyword argument are refused with the same message.
    """
    return field(default=default, metadata={"help": help, **check})


_CHECKS = {"int": check_int, "float": check_float, "bool": check_bool}


def _checked(spec: Field[Any], value: Any) -> Any:
    """``value`` of the field ``spec`` checked against its declaration (choices or bounds), converted losslessly."""
    meta = spec.metadata
    if value is None and spec.default is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{spec.name} must be one of {', '.join(meta['choices'])}; got {value!r}.")
    if "check" in meta:
        bounds = {key: meta[key] for key in ("minimum", "maximum", "exclusive_minimum") if key in meta}
        return _CHECKS[meta["check"]](value, spec.name, **bounds)
    return value


@dataclass(frozen=True)
class RunSetup:
    """One distillation run as the planner sees it.

    Every field's meaning is its ``help`` below (also the ``distill plan --help`` text). Fields named as in
    :class:`~distill.DistillConfig` (:data:`CONFIG_FIELDS`) mean what they mean there; the others say how the
    run is held (GPUs, LoRA, teacher kind, precision), which a ``DistillConfig`` does not hold or holds
    spread over several fields (see :func:`~distill.planning.plan_from_config`).

    Precision: ``mixed`` is fp32 weights and optimizer states with bf16 autocast compute (``bf16=True`` on
    an fp32 student); ``bf16`` is weights, gradients and optimizer states all bf16 (``transformers.Trainer``
    on a model loaded in bf16: an Adam step smaller than half a bf16 ULP of a weight does not move it, so
    full fine-tunes at small learning rates want ``mixed``); ``fp32`` is no 16-bit anywhere (a CPU). LoRA
    bases are kept in bf16 under ``mixed`` too; adapters are fp32 in every mode (peft's default).
    """

    student: ModelSpec = field(
        metadata={
            "help": "the student: a catalogue name (e.g. Qwen/Qwen2.5-Coder-1.5B) or a config.json file or folder "
            "(no weights are read)"
        }
    )
    teacher: ModelSpec | None = field(
        metadata={"help": "the teacher, as --student; optional for a cache/server teacher"}
    )
    gpu: GPU = field(metadata={"help": "the GPU type every process runs on (catalogue name; prefixes work), or cpu"})
    num_gpus: int = _knob(1, "GPUs per node, one process each", check="int", minimum=1)
    nodes: int = _knob(
        1, "machines, each with num_gpus GPUs: the job runs nodes x num_gpus processes", check="int", minimum=1
    )
    max_length: int = _knob(2048, "tokens per row (rows are assumed full)", check="int", minimum=1)
    per_device_train_batch_size: int = _knob(1, "rows per micro-batch per GPU", check="int", minimum=1)
    gradient_accumulation_steps: int = _knob(1, "micro-batches per optimizer step", check="int", minimum=1)
    lora_rank: int | None = _knob(
        None, "LoRA rank on all 7 projections of every layer (default: a full fine-tune)", check="int", minimum=1
    )
    qlora: bool = _knob(
        False, f"4-bit NF4 student base under LoRA (rank {DEFAULT_QLORA_RANK} unless given)", check="bool"
    )
    teacher_mode: TeacherMode = _knob(
        "bf16",
        "how the teacher's targets are made: its weights here in fp32/bf16/fp16/8bit/4bit, a top-k cache read from "
        "disk (cache) or another machine (server); the last two cost this GPU no teacher weights",
        choices=TEACHER_MODES,
    )
    gradient_checkpointing: bool = _knob(False, "recompute each student layer in the backward", check="bool")
    loss_implementation: Literal["fused", "dense"] = _knob(
        "fused", "fused (chunked over tokens, no [tokens, V] logits) or dense", choices=LOSS_IMPLEMENTATIONS
    )
    loss_chunk_size: int | None = _knob(
        None, "tokens per fused-loss chunk (default: distill's for the vocabulary and device)", check="int", minimum=1
    )
    loss: str = _knob("jsd", "the divergence: any name or alias distill.losses accepts (jsd, forward_kl, skl, ...)")
    sharding: Sharding = _knob(
        "none", "how the student is spread: none (one GPU, or not distributed), ddp, fsdp2 or zero3", choices=SHARDINGS
    )
    teacher_sharding: str = _knob(
        "auto",
        "an in-process teacher split over the GPUs with FSDP2 (fsdp) or not (none); auto: when the student is sharded",
        choices=TEACHER_SHARDINGS,
    )
    optim: str = _knob(
        "adamw_torch",
        "the optimizer, as TrainingArguments.optim: AdamW keeps two states in the parameter's dtype, the 8-bit "
        "variants one byte each",
        choices=OPTIMIZERS,
    )
    precision: Precision = _knob(
        "mixed",
        "mixed (fp32 master weights, bf16 autocast), bf16 (every weight, gradient and state bf16) or fp32",
        choices=PRECISIONS,
    )
    padded: bool | None = _knob(
        None, "rows padded to a common length (attention masks kept); default: when the batch is > 1", check="bool"
    )
    cache_top_k: int = _knob(
        64, "entries per token of a cache/server teacher's sparse targets", check="int", minimum=1
    )
    mfu: float | None = _knob(
        None, "model FLOPs utilisation for every part (default: per-part values)", check="float", minimum=0,
        maximum=1, exclusive_minimum=True,
    )  # fmt: skip
    tokens: float | None = _knob(
        None, "training tokens per epoch (the budget, e.g. 50e6), for time and cost", check="float", minimum=0,
        exclusive_minimum=True,
    )  # fmt: skip
    num_train_epochs: float = _knob(1.0, "passes over --tokens", check="float", minimum=0, exclusive_minimum=True)
    lmbda: float = _knob(0.0, "share of on-policy steps (the student generates)", check="float", minimum=0, maximum=1)
    seq_kd: bool = _knob(False, "sequence-level KD: the teacher generates every batch's completions", check="bool")
    max_new_tokens: int = _knob(128, "tokens generated per completion on on-policy steps", check="int", minimum=1)
    hidden_layers: int = _knob(
        0, "mapped layer pairs of the intermediate-layer (hidden-state) loss; 0: off", check="int", minimum=0
    )
    hidden_projection: str = _knob(
        "auto",
        "how student states meet the teacher's width: learned (a trained linear map per pair), select (a pruned "
        "student's kept channels), none (identity), auto (learned when the widths differ, else none)",
        choices=HIDDEN_PROJECTIONS,
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            object.__setattr__(self, spec.name, _checked(spec, getattr(self, spec.name)))
        from distill.losses import Divergence  # the losses layer alone knows the names and their aliases

        object.__setattr__(self, "loss", Divergence(self.loss).name)
        if self.qlora and self.lora_rank is None:
            object.__setattr__(self, "lora_rank", DEFAULT_QLORA_RANK)
        if self.seq_kd and not self.teacher_in_process:
            raise ValueError(
                f"seq_kd=True plans the teacher generating here; teacher_mode={self.teacher_mode!r} does not run it."
            )
        if self.teacher is None and self.teacher_mode in IN_PROCESS_TEACHERS:
            raise ValueError(f"teacher_mode={self.teacher_mode!r} runs the teacher here: give its model (teacher=).")
        if self.sharding == "zero3" and self.loss_implementation == "fused":
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the student's LM head, which distill's fused loss reads directly (the "
                "trainer refuses it). Plan with loss_implementation='dense' for ZeRO-3, or use sharding='fsdp2'."
            )

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
        """Tokens one GPU processes per forward/backward, ``per_device_train_batch_size * max_length``."""
        return self.per_device_train_batch_size * self.max_length

    @property
    def world_size(self) -> int:
        """Processes (GPUs) in the job: ``nodes * num_gpus``."""
        return self.nodes * self.num_gpus

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all GPUs of all nodes."""
        return self.tokens_per_micro_batch * self.gradient_accumulation_steps * self.world_size

    @property
    def weight_precision(self) -> Precision:
        """How the student's trained weights, gradients and optimizer states are held.

        ``precision``, except under FSDP2: accelerate (``fsdp2_prepare_model``) upcasts every trainable parameter
        that is not fp32 to fp32 when mixed precision is on, so a bf16 student keeps fp32 shards (and fp32
        gradients and AdamW states) with bf16 compute: ``mixed``, twice the bytes of ``bf16``.
        """
        return "mixed" if self.sharding == "fsdp2" and self.precision == "bf16" else self.precision

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
        return self.per_device_train_batch_size > 1 if self.padded is None else self.padded

    @property
    def learned_hidden_projection(self) -> bool:
        """Whether the hidden-state loss trains a linear map per mapped layer (student width -> teacher's)."""
        if self.hidden_layers == 0 or self.teacher is None:
            return False
        if self.hidden_projection == "auto":
            return self.student.hidden_size != self.teacher.hidden_size
        return self.hidden_projection == "learned"

    @property
    def eight_bit_optimizer(self) -> bool:
        """Whether the optimizer keeps its two AdamW states in 8 bits (bitsandbytes) rather than the weights' dtype."""
        return self.optim in EIGHT_BIT_OPTIMIZERS

    @property
    def teacher_in_process(self) -> bool:
        """Whether the teacher's weights live on this GPU."""
        return self.teacher_mode in IN_PROCESS_TEACHERS

    @property
    def student_sharded(self) -> bool:
        """Whether the student's weights, gradients and optimizer states are split over the GPUs."""
        return self.sharding in ("fsdp2", "zero3") and self.world_size > 1

    @property
    def teacher_sharded(self) -> bool:
        """Whether an in-process teacher's weights are split over the GPUs (FSDP2)."""
        wanted = self.student_sharded if self.teacher_sharding == "auto" else self.teacher_sharding == "fsdp"
        return wanted and self.world_size > 1 and self.teacher_in_process

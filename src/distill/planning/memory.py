"""Peak memory of one GPU during a distillation step, as named items.

A step has moments that do not overlap: the teacher's no-grad forward, then the student's forward,
loss and backward, then the optimizer step (and, on on-policy steps, generation before all of them).
Weights, optimizer states and the CUDA context are alive throughout; the rest belongs to one moment.
The peak is the persistent items plus the largest moment, and :class:`MemoryEstimate` lists every
item with whether it is part of that peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.planning import activations
from distill.planning.setup import RunSetup

__all__ = [
    "GIB",
    "MemoryEstimate",
    "MemoryItem",
    "estimate_memory",
    "gathered_student_bytes",
    "gathered_teacher_bytes",
    "host_bytes_per_node",
    "teacher_whole_bytes",
]

GIB = 2**30
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack

# NF4 with double quantization (distill's 4-bit): half a byte per weight, one 8-bit absmax per 64
# weights, and one fp32 scale per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_PARAM = 1.0  # LLM.int8(); plus one fp32 scale per output row (counted separately)

PERSISTENT = "persistent"
FORWARD_BACKWARD = "forward/backward"
TEACHER_FORWARD = "teacher forward"
OPTIMIZER_STEP = "optimizer step"
GENERATION = "on-policy generation"


@dataclass(frozen=True)
class MemoryItem:
    """One named piece of a GPU's memory.

    Attributes:
        name: what it is, e.g. ``"student weights"``.
        bytes: its size in bytes (per GPU).
        detail: how it was computed, for the table.
        phase: ``"persistent"`` or the moment of the step it lives in.
        at_peak: whether it is alive at the step's peak (and counted in the total).
    """

    name: str
    bytes: float
    detail: str
    phase: str = PERSISTENT
    at_peak: bool = True

    @property
    def gib(self) -> float:
        """Size in GiB."""
        return self.bytes / GIB


@dataclass(frozen=True)
class MemoryEstimate:
    """A GPU's predicted peak memory.

    Attributes:
        items: every item; those with ``at_peak`` sum to ``total_bytes``.
        capacity_bytes: the GPU's memory in bytes.
        peak_phase: the moment of the step where the peak is.
    """

    items: tuple[MemoryItem, ...]
    capacity_bytes: int
    peak_phase: str

    @property
    def total_bytes(self) -> float:
        """Predicted peak in bytes: the sum of the items alive at the peak."""
        return sum(item.bytes for item in self.items if item.at_peak)

    @property
    def fits(self) -> bool:
        """Whether the peak is within the GPU's memory."""
        return self.total_bytes <= self.capacity_bytes

    @property
    def utilisation(self) -> float:
        """Peak as a fraction of the GPU's memory."""
        return self.total_bytes / self.capacity_bytes

    @property
    def biggest(self) -> MemoryItem:
        """The largest item counted in the peak."""
        return max((item for item in self.items if item.at_peak), key=lambda item: item.bytes)

    def get(self, name: str) -> float:
        """Bytes of the item called ``name`` (0 when there is none)."""
        return sum(item.bytes for item in self.items if item.name == name)


def _student_weights(setup: RunSetup) -> MemoryItem:
    spec = setup.student
    shards = setup.world_size if setup.student_sharded else 1
    precision = setup.weight_precision  # a bf16 student under FSDP2 keeps fp32 shards (accelerate's upcast)
    if setup.training == "qlora":
        # peft's prepare_model_for_kbit_training casts everything left unquantized (embedding, head, norms) to fp32.
        unquantized = spec.num_params - spec.linear_params
        size = spec.linear_params * NF4_BYTES_PER_PARAM + unquantized * 4
        detail = (
            f"{spec.linear_params / 1e9:.2f}B NF4 projections + {unquantized / 1e9:.2f}B fp32 embedding/head/norms"
        )
    else:
        per_param = 2 if precision == "bf16" or (setup.training == "lora" and precision == "mixed") else 4
        size = spec.num_params * per_param
        detail = f"{spec.num_params / 1e9:.2f}B params x {per_param} B"
        if precision != setup.precision and setup.training == "full":
            detail += " (FSDP2 upcasts bf16 to fp32 shards)"
    if shards > 1:
        size /= shards
        detail += f" / {shards} GPUs"
    return MemoryItem("student weights", size, detail)


def _trainable(setup: RunSetup) -> tuple[float, float, float]:
    """(trainable parameters, gradient bytes per parameter, optimizer bytes per parameter)."""
    if setup.training == "full":
        trainable = setup.student.num_params
        grad_bytes = 2 if setup.weight_precision == "bf16" else 4
    else:
        trainable = setup.student.lora_params(setup.lora_rank or 0)
        grad_bytes = 4  # adapters are fp32 (peft's default)
    # torch AdamW keeps two states in the parameter's dtype; bitsandbytes' 8-bit AdamW one byte each.
    optimizer_bytes = 2.0 if setup.eight_bit_optimizer else 2 * grad_bytes
    return trainable, grad_bytes, optimizer_bytes


def _training_state(setup: RunSetup, accumulating: bool) -> list[MemoryItem]:
    trainable, grad_bytes, optimizer_bytes = _trainable(setup)
    shards = setup.world_size if setup.student_sharded else 1
    per = f" / {shards} GPUs" if shards > 1 else ""
    items = []
    if setup.training != "full":
        items.append(
            MemoryItem("LoRA adapters", trainable * 4 / shards, f"{trainable / 1e6:.1f}M params x 4 B (fp32){per}")
        )
    # Gradients are freed after each optimizer step (set to None), so without accumulation they do not
    # exist during the next forward; with it they persist across micro-batches.
    grad_phase = PERSISTENT if accumulating else OPTIMIZER_STEP
    items.append(
        MemoryItem(
            "gradients", trainable * grad_bytes / shards, f"{trainable / 1e6:,.0f}M x {grad_bytes} B{per}", grad_phase
        )
    )
    name = "optimizer states (8-bit AdamW)" if setup.eight_bit_optimizer else "optimizer states (AdamW)"
    items.append(MemoryItem(name, trainable * optimizer_bytes / shards, f"{optimizer_bytes:g} B/param{per}"))
    projection_params = activations.hidden_projection_params(setup)
    if projection_params:
        # fp32 weights, gradients and two AdamW states, replicated on every GPU (outside the sharded student).
        detail = f"{projection_params / 1e6:.1f}M params x 16 B (fp32 weight, grad, AdamW)"
        items.append(MemoryItem("hidden-state projections", projection_params * 16, detail))
    if setup.sharding == "ddp" and setup.world_size > 1:
        # DDP copies gradients into flat all-reduce buckets (gradient_as_bucket_view=False by default).
        items.append(MemoryItem("DDP gradient buckets", trainable * grad_bytes, "one more copy of the gradients"))
    return items


def teacher_whole_bytes(setup: RunSetup) -> tuple[float, str]:
    """An in-process teacher's weights, whole (not divided by sharding), and how they were counted."""
    spec = setup.teacher
    assert spec is not None
    mode = setup.teacher_mode
    unquantized = spec.num_params - spec.linear_params
    if mode == "4bit":
        return spec.linear_params * NF4_BYTES_PER_PARAM + unquantized * 2, "NF4 projections, bf16 embedding/head/norms"
    if mode == "8bit":
        row_scales = 4 * spec.num_layers * sum(fan_out for _, fan_out in spec.linear_shapes())
        size = spec.linear_params * INT8_BYTES_PER_PARAM + row_scales + unquantized * 2
        return size, "int8 projections, bf16 embedding/head/norms"
    per_param = 4 if mode == "fp32" else 2
    return spec.num_params * per_param, f"{spec.num_params / 1e9:.2f}B params x {per_param} B ({mode})"


def _teacher_weights(setup: RunSetup) -> MemoryItem | None:
    if not setup.teacher_in_process:
        return None
    mode = setup.teacher_mode
    size, detail = teacher_whole_bytes(setup)
    if setup.teacher_sharded:
        size /= setup.world_size
        detail += f" / {setup.world_size} GPUs"
    return MemoryItem(f"teacher weights ({mode})", size, detail)


def gathered_student_bytes(setup: RunSetup) -> float:
    """FSDP2 / ZeRO-3: two student layers in flight and the unsharded root (embedding, head), in the compute dtype.

    The fused loss reads the root's unsharded head itself (``head_unsharded_through_loss`` keeps it from the
    forward to the backward): no second copy of it. Also what a sharded student holds while it generates.
    """
    spec = setup.student
    layer = spec.layer_linear_params + spec.layer_other_params
    return (2 * layer + spec.embedding_params + spec.head_params) * setup.compute_bytes


def gathered_teacher_bytes(setup: RunSetup) -> float:
    """A sharded teacher's forward (or decoding step): two layers in flight and its embedding/head, in its dtype."""
    spec = setup.teacher
    assert spec is not None
    layer = spec.layer_linear_params + spec.layer_other_params
    return (2 * layer + spec.embedding_params + spec.head_params) * activations.teacher_element_bytes(setup)


def _forward_backward(setup: RunSetup) -> list[MemoryItem]:
    phase = FORWARD_BACKWARD
    tokens = setup.tokens_per_micro_batch
    checkpointing = "with" if setup.gradient_checkpointing else "without"
    items = [
        MemoryItem(
            "student activations",
            activations.student_activation_bytes(setup),
            f"{tokens} tokens x {setup.student.num_layers} layers, {checkpointing} checkpointing",
            phase,
        ),
        MemoryItem("backward temporaries", activations.backward_working_bytes(setup), "one layer's gradients", phase),
    ]
    loss_bytes, loss_detail = activations.loss_buffer_bytes(setup)
    items.append(MemoryItem(f"loss buffers ({setup.loss_implementation})", loss_bytes, loss_detail, phase))
    target_detail = "final hidden states" if setup.teacher_in_process else f"top-{setup.cache_top_k} ids + log-probs"
    items.append(MemoryItem("teacher targets", activations.teacher_output_bytes(setup), target_detail, phase))
    if setup.hidden_layers:
        states, buffers = activations.hidden_loss_bytes(setup)
        what = f"{setup.hidden_layers} mapped layers"
        items.append(MemoryItem("hidden-state targets", states, f"teacher outputs of {what}", phase))
        detail = f"~2 fp32 [tokens x H] per layer, {what}"
        items.append(MemoryItem("hidden-state loss buffers", buffers, detail, phase))
    if setup.training == "full" and setup.precision == "mixed" and not setup.student_sharded:
        # Autocast casts each fp32 projection weight to bf16 once per forward; autograd keeps the copies.
        copies = setup.student.linear_params * 2
        items.append(MemoryItem("bf16 weight copies (autocast)", copies, "projections x 2 B", phase))
    if setup.student_sharded:
        items.append(
            MemoryItem("gathered student weights", gathered_student_bytes(setup), "2 layers + embedding/head", phase)
        )
        if setup.training == "full" and setup.loss_implementation == "fused":
            # The loss accumulates the head's gradient in fp32 (in its buffers) and hands FSDP a copy in the
            # unsharded head's compute dtype, which lives until its reduce-scatter.
            head_grad = setup.student.vocab_size * setup.student.hidden_size * setup.compute_bytes
            items.append(MemoryItem("head gradient (unsharded)", head_grad, "[V x H] compute dtype", phase))
    if setup.teacher_sharded and setup.loss_implementation == "fused":
        assert setup.teacher is not None
        element = activations.teacher_element_bytes(setup)  # full_tensor() of the teacher's own-dtype shards
        head = setup.teacher.vocab_size * setup.teacher.hidden_size * element
        items.append(MemoryItem("gathered teacher head", head, f"[V x H_t] x {element} B for the loss", phase))
    return items


def _teacher_forward(setup: RunSetup) -> list[MemoryItem]:
    items = [
        MemoryItem(
            "teacher forward temporaries",
            activations.teacher_forward_bytes(setup),
            "one layer at a time, no grad",
            TEACHER_FORWARD,
        )
    ]
    if setup.teacher_sharded:
        gathered = gathered_teacher_bytes(setup)
        items.append(MemoryItem("gathered teacher weights", gathered, "2 layers + embedding/head", TEACHER_FORWARD))
    return items


def _generation(setup: RunSetup) -> list[MemoryItem]:
    """The larger generator's moment: the student on on-policy steps (``lmbda``), the teacher under ``seq_kd``.

    Each holds its KV cache and, when sharded, the weights it gathers for every new token (the same two layers
    and embedding/head as a forward: ``reshard_after_forward`` frees them after each token's forward).
    """
    rows, length = setup.per_device_train_batch_size, setup.max_length
    generators: list[list[MemoryItem]] = []
    if setup.lmbda > 0:
        spec = setup.student
        kv_cache = 2 * spec.num_layers * spec.kv_dim * length * rows * setup.compute_bytes
        items = [MemoryItem("generation KV cache", kv_cache, f"{rows} rows x {length} positions", GENERATION)]
        if setup.student_sharded:
            detail = "re-gathered for every new token"
            items.append(MemoryItem("gathered student weights", gathered_student_bytes(setup), detail, GENERATION))
        generators.append(items)
    if setup.seq_kd:
        spec = setup.teacher  # type: ignore[assignment]
        assert spec is not None
        element = activations.teacher_element_bytes(setup)
        kv_cache = 2 * spec.num_layers * spec.kv_dim * length * rows * element
        detail = f"{rows} rows x {length} positions"
        items = [MemoryItem("teacher generation KV cache", kv_cache, detail, GENERATION)]
        if setup.teacher_sharded:
            detail = "re-gathered for every new token"
            items.append(MemoryItem("gathered teacher weights", gathered_teacher_bytes(setup), detail, GENERATION))
        generators.append(items)
    return max(generators, key=lambda items: sum(item.bytes for item in items), default=[])


def host_bytes_per_node(setup: RunSetup) -> float:
    """Host (CPU) memory one node needs while the models load: each of its ``num_gpus`` processes reads the student
    and an unquantized in-process teacher onto the CPU before they are sharded or placed (a 4-bit / 8-bit teacher
    is quantized straight onto its GPU). Under ``fsdp_cpu_ram_efficient_loading`` only the job's rank 0 reads
    the teacher (and accelerate's rank 0 the student): divide by ``num_gpus`` on node 0, ~0 on the others.
    """
    student = setup.student.num_params * (2 if setup.precision == "bf16" else 4)
    teacher = 0.0
    if setup.teacher_in_process and setup.teacher_mode not in ("4bit", "8bit"):
        teacher = teacher_whole_bytes(setup)[0]
    return setup.num_gpus * (student + teacher)


def estimate_memory(setup: RunSetup) -> MemoryEstimate:
    """Predict the peak memory of one GPU for ``setup``, item by item.

    Args:
        setup: the run.

    Returns:
        A :class:`MemoryEstimate`: the items (bytes per GPU), which of them are alive at the peak, the
        moment of the peak and the GPU's capacity. ``total_bytes`` is the predicted peak.
    """
    accumulating = setup.gradient_accumulation_steps > 1
    persistent: list[MemoryItem] = [_student_weights(setup)]
    persistent += _training_state(setup, accumulating)
    teacher = _teacher_weights(setup)
    if teacher is not None:
        persistent.append(teacher)
    if setup.gpu.cuda:
        persistent.append(MemoryItem("CUDA context + allocator reserve", CUDA_CONTEXT_BYTES, "fixed"))

    phases = {
        FORWARD_BACKWARD: _forward_backward(setup),
        TEACHER_FORWARD: _teacher_forward(setup),
        OPTIMIZER_STEP: [item for item in persistent if item.phase == OPTIMIZER_STEP],
        GENERATION: _generation(setup),
    }
    persistent = [item for item in persistent if item.phase == PERSISTENT]
    peak_phase = max(phases, key=lambda phase: sum(item.bytes for item in phases[phase]))
    items = persistent + [
        MemoryItem(item.name, item.bytes, item.detail, phase, at_peak=phase == peak_phase)
        for phase, phase_items in phases.items()
        for item in phase_items
    ]
    return MemoryEstimate(tuple(items), setup.gpu.memory_bytes, peak_phase)

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

__all__ = ["GIB", "MemoryEstimate", "MemoryItem", "estimate_memory"]

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
    shards = setup.num_gpus if setup.student_sharded else 1
    if setup.training == "qlora":
        # peft's prepare_model_for_kbit_training casts everything left unquantized (embedding, head, norms) to fp32.
        unquantized = spec.num_params - spec.linear_params
        size = spec.linear_params * NF4_BYTES_PER_PARAM + unquantized * 4
        detail = (
            f"{spec.linear_params / 1e9:.2f}B NF4 projections + {unquantized / 1e9:.2f}B fp32 embedding/head/norms"
        )
    else:
        per_param = 2 if setup.precision == "bf16" or (setup.training == "lora" and setup.precision == "mixed") else 4
        size = spec.num_params * per_param
        detail = f"{spec.num_params / 1e9:.2f}B params x {per_param} B"
    if shards > 1:
        size /= shards
        detail += f" / {shards} GPUs"
    return MemoryItem("student weights", size, detail)


def _trainable(setup: RunSetup) -> tuple[float, float, float]:
    """(trainable parameters, gradient bytes per parameter, optimizer bytes per parameter)."""
    if setup.training == "full":
        trainable = setup.student.num_params
        grad_bytes = 2 if setup.precision == "bf16" else 4
    else:
        trainable = setup.student.lora_params(setup.lora_rank or 0)
        grad_bytes = 4  # adapters are fp32 (peft's default)
    # torch AdamW keeps two states in the parameter's dtype; bitsandbytes' 8-bit AdamW one byte each.
    optimizer_bytes = 2.0 if setup.eight_bit_optimizer else 2 * grad_bytes
    return trainable, grad_bytes, optimizer_bytes


def _training_state(setup: RunSetup, accumulating: bool) -> list[MemoryItem]:
    trainable, grad_bytes, optimizer_bytes = _trainable(setup)
    shards = setup.num_gpus if setup.student_sharded else 1
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
    if setup.sharding == "ddp" and setup.num_gpus > 1:
        # DDP copies gradients into flat all-reduce buckets (gradient_as_bucket_view=False by default).
        items.append(MemoryItem("DDP gradient buckets", trainable * grad_bytes, "one more copy of the gradients"))
    return items


def _teacher_weights(setup: RunSetup) -> MemoryItem | None:
    if not setup.teacher_in_process:
        return None
    spec = setup.teacher
    assert spec is not None
    mode = setup.teacher_mode
    unquantized = spec.num_params - spec.linear_params
    if mode == "4bit":
        size = spec.linear_params * NF4_BYTES_PER_PARAM + unquantized * 2
        detail = "NF4 projections, bf16 embedding/head/norms"
    elif mode == "8bit":
        row_scales = 4 * spec.num_layers * sum(fan_out for _, fan_out in spec.linear_shapes())
        size = spec.linear_params * INT8_BYTES_PER_PARAM + row_scales + unquantized * 2
        detail = "int8 projections, bf16 embedding/head/norms"
    else:
        per_param = 4 if mode == "fp32" else 2
        size = spec.num_params * per_param
        detail = f"{spec.num_params / 1e9:.2f}B params x {per_param} B ({mode})"
    if setup.teacher_sharded:
        size /= setup.num_gpus
        detail += f" / {setup.num_gpus} GPUs"
    return MemoryItem(f"teacher weights ({mode})", size, detail)


def _gathered_bytes(setup: RunSetup) -> float:
    """FSDP2 / ZeRO-3: two student layers in flight, the unsharded root (embedding, head) and the loss's head."""
    spec, element = setup.student, setup.compute_bytes
    layer = spec.layer_linear_params + spec.layer_other_params
    root = spec.embedding_params + spec.head_params
    fused_head = spec.vocab_size * spec.hidden_size if setup.loss_implementation == "fused" else 0
    return (2 * layer + root + fused_head) * element


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
            MemoryItem("gathered student weights", _gathered_bytes(setup), "2 layers + embedding/head", phase)
        )
    if setup.teacher_sharded and setup.loss_implementation == "fused":
        assert setup.teacher is not None
        head = setup.teacher.vocab_size * setup.teacher.hidden_size * 2
        items.append(MemoryItem("gathered teacher head", head, "[V x H_t] for the loss", phase))
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
        spec = setup.teacher
        assert spec is not None
        layer = spec.layer_linear_params + spec.layer_other_params
        gathered = (2 * layer + spec.embedding_params + spec.head_params) * 2
        items.append(MemoryItem("gathered teacher weights", gathered, "2 layers + embedding/head", TEACHER_FORWARD))
    return items


def _generation(setup: RunSetup) -> list[MemoryItem]:
    if setup.lmbda == 0:
        return []
    spec = setup.student
    rows = setup.per_device_train_batch_size
    kv_cache = 2 * spec.num_layers * spec.kv_dim * setup.max_length * rows * setup.compute_bytes
    return [MemoryItem("generation KV cache", kv_cache, f"{rows} rows x {setup.max_length} positions", GENERATION)]


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

"""Bytes of the tensors that live only during a step: saved activations, loss buffers, the teacher's forward.

Every count here is per *token* (one position of one row) unless said otherwise, so a micro-batch
multiplies by ``per_device_batch * seq_len``. The numbers were enumerated with
``torch.autograd.graph.saved_tensors_hooks`` on transformers' Llama/Qwen2 layers with SDPA attention
(torch 2.13, transformers 5.23, peft 0.21), counting each storage once and leaving parameters out,
and the loss buffers were measured as peak RSS of distill's losses on a CPU; see ``docs/planning.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.planning.models import ModelSpec
from distill.planning.setup import RunSetup

__all__ = [
    "FUSED_LOSS_BUFFERS",
    "FUSED_SPARSE_LOSS_BUFFERS",
    "LOSS_BUFFERS",
    "SPARSE_LOSS_BUFFERS",
    "backward_working_bytes",
    "hidden_loss_bytes",
    "hidden_projection_params",
    "layer_saved_bytes",
    "loss_buffer_bytes",
    "residual_bytes",
    "student_activation_bytes",
    "teacher_forward_bytes",
    "teacher_output_bytes",
]


@dataclass(frozen=True)
class _SavedPerLayer:
    """Bytes one decoder layer keeps for the backward, per token, per unit of each width.

    ``hidden`` multiplies ``H``, ``query`` the query width, ``key_value`` the key/value width (the query
    width when grouped-query keys are repeated for a masked batch), ``mlp`` the MLP width ``I`` and
    ``lora`` the LoRA rank times the 7 adapted projections.
    """

    hidden: float
    query: float
    key_value: float
    mlp: float
    lora: float = 0.0


# What each layer saves, by (what is trained, precision). Common to all: the fp32 copy of each RMSNorm's
# input (4H twice; the norm upcasts), q, k, v after RoPE and the attention output (SDPA keeps them plus a
# float32 log-sum-exp per head; the output is o_proj's input too), and the MLP's gate, SiLU(gate), up and
# their product (down_proj's input). Then per mode:
# - full fp32: the norm's normalised and weighted outputs too (the norm weight and the projections need
#   them for their gradients): 3H per norm at 4 bytes.
# - full bf16 (a model loaded in bf16): as fp32 at 2 bytes, but the norm's fp32 input copy stays 4 bytes.
# - full mixed (fp32 weights, bf16 autocast): the residual stream and norms stay fp32, and autocast makes
#   one bf16 copy of a norm's output per projection reading it (3 for q/k/v, 2 for gate/up).
# - LoRA (frozen base): nothing for the base weights' gradients, so the norm's normalised output is not
#   kept; each adapter keeps its input. With fp32 adapters on a bf16 base under autocast, each adapter
#   keeps its own 16-bit copy of its input (5 of a norm output, one of the attention output, one of the
#   MLP product) and its rank-r intermediate.
# - QLoRA: as LoRA, but the base's fp32 norms (peft casts them) make the gate/up/SiLU outputs fp32.
_SAVED: dict[tuple[str, str], _SavedPerLayer] = {
    ("full", "fp32"): _SavedPerLayer(hidden=24, query=8, key_value=8, mlp=16),
    ("full", "bf16"): _SavedPerLayer(hidden=16, query=4, key_value=4, mlp=8),
    ("full", "mixed"): _SavedPerLayer(hidden=26, query=4, key_value=4, mlp=8),
    ("lora", "fp32"): _SavedPerLayer(hidden=16, query=8, key_value=8, mlp=16, lora=4),
    ("lora", "bf16"): _SavedPerLayer(hidden=18, query=6, key_value=4, mlp=8, lora=2),
    ("qlora", "bf16"): _SavedPerLayer(hidden=18, query=6, key_value=4, mlp=14, lora=2),
}

# Peak [rows x V] float32 buffers alive at once inside distill's dense loss (per micro-batch), forward and
# backward together, measured with fp32 logits: both models' logits and log-softmaxes, the divergence's
# elementwise terms and the ones autograd keeps, the teacher-entropy metric, and the gradient. 16-bit
# logits add one more (their copy before upcasting). Keyed by the losses layer's canonical names (RunSetup.loss
# is canonical; a test keeps the keys equal to distill.losses' divergences).
LOSS_BUFFERS: dict[str, float] = {
    "forward_kl": 10.0,
    "reverse_kl": 11.0,
    "jsd": 14.0,
    "skew_kl": 12.0,
    "skew_reverse_kl": 13.0,
    "tvd": 11.0,
}
# A sparse (top-k) teacher: only the student's [rows x V] logits, log-softmax and their gradient.
SPARSE_LOSS_BUFFERS = 5.0
# The fused loss's closed-form chunk body (per chunk, every divergence alike; measured as peak RSS of
# fused_distillation_loss forward+backward, fp32, [2048 tokens, V = 32,768], chunk 512): a dense teacher
# 4.0 (student logits -> probs, log-probs -> gradient, the teacher's two), a sparse one 1.9. 16-bit
# logits add half a buffer (the matmul's 16-bit output before its upcast). Soft-capping the student or a
# CE term at a temperature other than 1 add one each (not modelled).
FUSED_LOSS_BUFFERS = 4.0
FUSED_SPARSE_LOSS_BUFFERS = 2.0


def _mode(setup: RunSetup) -> _SavedPerLayer:
    precision = "fp32" if setup.precision == "fp32" else "bf16"
    if setup.training == "full":
        precision = setup.precision
    training = "lora" if setup.training == "qlora" and precision == "fp32" else setup.training
    return _SAVED[(training, precision)]


def residual_bytes(setup: RunSetup) -> int:
    """Bytes per element of the student's residual stream (a layer's input and output).

    fp32 when the weights that write it are fp32: precision ``fp32`` or ``mixed`` full fine-tunes, and
    QLoRA (peft casts the embedding and norms to fp32); otherwise bf16.
    """
    if setup.precision == "fp32" or setup.training == "qlora":
        return 4
    return 4 if setup.training == "full" and setup.precision == "mixed" else 2


def layer_saved_bytes(setup: RunSetup) -> float:
    """Bytes per token that one student decoder layer keeps for the backward (no checkpointing).

    Counts the tensors listed in ``_SAVED`` (see the comment there), plus two fp32 RMSNorm
    reciprocals (8 bytes), the attention's fp32 log-sum-exp (4 bytes per head) and, for padded
    batches, the float attention mask SDPA keeps per layer (``seq_len`` elements per token, in the
    compute dtype) and the grouped-query keys/values repeated to the query width. Parameters (and the
    bf16 weight copies of mixed precision) are not activations and are counted elsewhere.
    """
    spec, mode = setup.student, _mode(setup)
    key_value_width = spec.q_dim if setup.is_padded else spec.kv_dim
    per_token = (
        mode.hidden * spec.hidden_size
        + mode.query * spec.q_dim
        + mode.key_value * key_value_width
        + mode.mlp * spec.intermediate_size
        + mode.lora * (setup.lora_rank or 0) * len(spec.linear_shapes())
        + 8
        + 4 * spec.num_heads
    )
    if setup.is_padded:
        per_token += setup.max_length * setup.compute_bytes
    return float(per_token)


def _final_norm_bytes(setup: RunSetup) -> float:
    """Per token: the final norm's fp32 input copy, its normalised output if its weight trains, and its output."""
    hidden = setup.student.hidden_size
    normalised = residual_bytes(setup) * hidden if setup.training == "full" else 0
    return 4 * hidden + normalised + residual_bytes(setup) * hidden


def student_activation_bytes(setup: RunSetup) -> float:
    """Bytes of student activations alive when the backward starts, for one micro-batch.

    Without gradient checkpointing: every layer's saved tensors (:func:`layer_saved_bytes`) plus the
    final norm's. With it (one checkpoint per layer, as ``transformers`` does): each layer's input in
    the residual dtype, plus one layer's saved tensors while that layer is recomputed in the backward.
    """
    tokens = setup.tokens_per_micro_batch
    layers = setup.student.num_layers
    per_layer = layer_saved_bytes(setup)
    if setup.gradient_checkpointing:
        saved = layers * residual_bytes(setup) * setup.student.hidden_size + per_layer
    else:
        saved = layers * per_layer
    return tokens * (saved + _final_norm_bytes(setup))


def backward_working_bytes(setup: RunSetup) -> float:
    """Gradient temporaries while one layer runs its backward, for one micro-batch.

    The gradients of the MLP's three ``I``-wide tensors (gate, up, their product) and two ``H``-wide
    ones (the layer's output gradient and the one being formed), in the activations' dtypes.
    """
    spec, mode = setup.student, _mode(setup)
    mlp_element = mode.mlp / 4  # bytes per element of the MLP tensors (4 of them are saved)
    per_token = 3 * mlp_element * spec.intermediate_size + 2 * residual_bytes(setup) * spec.hidden_size
    return setup.tokens_per_micro_batch * per_token


def _loss_buffer_count(setup: RunSetup) -> float:
    sixteen_bit = setup.compute_bytes == 2
    if setup.loss_implementation == "fused":
        count = FUSED_LOSS_BUFFERS if setup.teacher_in_process else FUSED_SPARSE_LOSS_BUFFERS
        return count + (0.5 if sixteen_bit else 0.0)
    count = LOSS_BUFFERS[setup.loss] if setup.teacher_in_process else SPARSE_LOSS_BUFFERS
    return count + (1.0 if sixteen_bit else 0.0)


def loss_buffer_bytes(setup: RunSetup) -> tuple[float, str]:
    """Peak bytes inside the distillation loss for one micro-batch, and a line saying what they are.

    Fused: ``k`` float32 ``[chunk, V]`` buffers (:data:`FUSED_LOSS_BUFFERS`, or
    :data:`FUSED_SPARSE_LOSS_BUFFERS` for a cache/server teacher; +0.5 for 16-bit logits), the loss's copy of
    the student's hidden states and their gradient (``[tokens, H]`` each), and for a full fine-tune the
    float32 gradient of the head ``[V, H]`` that the fused loss accumulates in its forward. Dense: ``k``
    buffers at ``[tokens, V]``, ``k`` from :data:`LOSS_BUFFERS` (or :data:`SPARSE_LOSS_BUFFERS`; +1 for
    16-bit logits). Every token is assumed to carry loss (with
    ``completion_only_loss`` only completion tokens do, which makes the fused form smaller).
    """
    tokens = setup.tokens_per_micro_batch
    vocab = setup.vocab
    count = _loss_buffer_count(setup)
    if setup.loss_implementation == "dense":
        return count * tokens * vocab * 4, f"{count:g} x [{tokens} tokens x {vocab} vocab] fp32 logit buffers"
    chunk = min(setup.chunk_size, tokens)
    total = count * chunk * vocab * 4
    total += 2 * tokens * setup.student.hidden_size * residual_bytes(setup)
    detail = f"{count:g} x [{chunk}-token chunk x {vocab} vocab] fp32 buffers"
    if setup.training == "full":
        total += vocab * setup.student.hidden_size * 4
        detail += " + fp32 head gradient [V x H]"
    return total, detail


def teacher_element_bytes(setup: RunSetup) -> int:
    """Bytes per element of the teacher's compute (and of its unquantized weights when it shards them)."""
    # An fp32 teacher computes in fp32; bf16/fp16 and quantized teachers (bf16 compute dtype) in 16 bits.
    return 4 if setup.teacher_mode == "fp32" else 2


def teacher_output_bytes(setup: RunSetup) -> float:
    """Bytes of the teacher's targets that stay alive through the student's step, for one micro-batch.

    In-process teacher: its final hidden states ``[tokens, H_t]`` and the loss's row-selected copy.
    Cache/server teacher: top-k ids (int64) and log-probs (fp32) per token, and the loss's copy.
    """
    tokens = setup.tokens_per_micro_batch
    if not setup.teacher_in_process:
        return 2 * tokens * setup.cache_top_k * (8 + 4)
    assert setup.teacher is not None
    return 2 * tokens * setup.teacher.hidden_size * teacher_element_bytes(setup)


def teacher_forward_bytes(setup: RunSetup) -> float:
    """Peak temporaries of the teacher's no-grad forward for one micro-batch (0 for a cache/server teacher).

    Without autograd a layer's intermediates are freed as it finishes, so the peak is one layer's:
    the residual stream, the norm's fp32 copy, q/k/v and the attention output, and three ``I``-wide
    MLP tensors; plus, for a 4-bit/8-bit teacher, one projection dequantized to bf16 at a time.
    """
    if not setup.teacher_in_process:
        return 0.0
    spec: ModelSpec = setup.teacher  # type: ignore[assignment]
    element = teacher_element_bytes(setup)
    per_token = element * (2 * spec.hidden_size + 2 * spec.q_dim + 2 * spec.kv_dim + 3 * spec.intermediate_size)
    per_token += 4 * spec.hidden_size
    total = setup.tokens_per_micro_batch * per_token
    if setup.teacher_mode in ("4bit", "8bit"):
        total += 2 * max(fan_in * fan_out for fan_in, fan_out in spec.linear_shapes())
    return float(total)


def hidden_projection_params(setup: RunSetup) -> int:
    """Parameters of the learned hidden-state maps: ``H_s x H_t`` per mapped layer (0 when none is learned)."""
    if not setup.learned_hidden_projection:
        return 0
    assert setup.teacher is not None
    return setup.hidden_layers * setup.student.hidden_size * setup.teacher.hidden_size


def hidden_loss_bytes(setup: RunSetup) -> tuple[float, float]:
    """Bytes of the intermediate-layer loss for one micro-batch: ``(teacher states, loss buffers)``.

    The teacher's outputs of the mapped layers, ``[tokens, H_t]`` each in its compute dtype, stay alive
    from its forward to the loss. Autograd keeps, per mapped layer until the backward, float32
    ``[tokens, H]`` tensors (``H`` the compared width): the difference for ``mse``, the student's and
    the teacher's rows for ``cosine``; two are counted. A learned map adds its float32 copy of a
    16-bit input ``[tokens, H_s]``. The student's layer outputs are activations already counted.
    Estimated from what the loss's autograd graph saves (every token assumed to count), not measured.
    """
    if setup.hidden_layers == 0 or not setup.teacher_in_process:
        return 0.0, 0.0
    assert setup.teacher is not None
    tokens, layers = setup.tokens_per_micro_batch, setup.hidden_layers
    compared = setup.teacher.hidden_size if setup.hidden_projection != "select" else setup.student.hidden_size
    teacher_states = layers * tokens * setup.teacher.hidden_size * teacher_element_bytes(setup)
    per_layer = 2 * 4 * compared
    if setup.learned_hidden_projection and residual_bytes(setup) == 2:
        per_layer += 4 * setup.student.hidden_size
    return float(teacher_states), float(layers * tokens * per_layer)

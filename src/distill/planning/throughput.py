"""Time and money: FLOPs per trained token, an assumed utilisation, step time, GPU-hours and dollars.

Per trained token (``N`` = projection weights, ``HV`` = head matmul, ``A = 2 * max_length * q_dim * L``
= causal attention scores and mixing in the forward, ``N_lora`` = adapter weights)::

    student forward   2N + 2HV + A (+ 2 N_lora)
    student backward  full fine-tune: 4N + 4HV + 2A   (gradients of inputs and of weights)
                      LoRA / QLoRA:   2N + 2HV + 2A + 4 N_lora   (frozen weights need no weight gradient,
                                      but the input gradient still goes through every frozen matmul)
    recompute         2N + A (+ 2 N_lora) with gradient checkpointing (the head is not recomputed)
    teacher forward   2N_t + 2H_tV + A_t   (0 for a cache or server teacher)

Time = FLOPs / (peak dense bf16 FLOP/s x MFU), with the student and teacher parts at their own
MFU (model FLOPs utilisation), so communication, kernel launch overhead, the loss's softmax
arithmetic and dequantization are all folded into the MFU. On-policy steps (``lmbda``: the student) and
``seq_kd`` (the teacher, every step) add generation, modelled as memory-bound decoding: each new token
reads the generator's weights and KV cache once per row batch. A *sharded* generator (FSDP2 with
``reshard_after_forward``) frees its weights after every forward, so each new token all-gathers all of
them again: ``(W - 1) / W`` of its compute-dtype weights reach each GPU per token, over NVLink/PCIe within
a node and over the network when the job spans nodes. FSDP prefetches the next layer's gather while the
current one runs, so a token costs the slower of decoding and re-gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.planning.activations import teacher_element_bytes
from distill.planning.memory import NF4_BYTES_PER_PARAM, teacher_whole_bytes
from distill.planning.models import ModelSpec
from distill.planning.setup import RunSetup

__all__ = [
    "DEFAULT_MFU",
    "INTER_NODE_BANDWIDTH",
    "Cost",
    "Throughput",
    "estimate_cost",
    "estimate_throughput",
    "flops_per_token",
    "gather_bandwidth",
]

# Assumed model FLOPs utilisation by what runs the matmuls. bf16 training of a dense model with
# FSDP-style frameworks typically reaches 0.3-0.45; 4-bit weights are dequantized before every
# matmul; LLM.int8() splits outliers into a separate fp16 matmul; fp32 matmuls run without tensor cores.
DEFAULT_MFU: dict[str, float] = {
    "bf16": 0.35,
    "fp16": 0.35,
    "mixed": 0.35,
    "4bit": 0.25,
    "qlora": 0.25,
    "8bit": 0.12,
    "fp32": 0.03,
}
# Share of peak memory bandwidth that transformers' generate() reaches when decoding (a rough guess).
DECODE_BANDWIDTH_EFFICIENCY = 0.3
# Bytes/s one GPU receives from other nodes: one 400 Gb/s InfiniBand / RoCE NIC per GPU, as H100/H200 clusters
# are built (an assumption: a slower fabric makes everything that crosses nodes slower still).
INTER_NODE_BANDWIDTH = 50e9


def _attention_flops(spec: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of QK^T and AV over a causal sequence: ``4 * (seq_len / 2) * q_dim`` per layer."""
    return 2.0 * seq_len * spec.q_dim * spec.num_layers


def flops_per_token(setup: RunSetup) -> dict[str, float]:
    """FLOPs per trained token of each part of a step, from the formulas in this module's docstring.

    Returns:
        ``{"student forward", "student backward", "recompute", "teacher forward"}`` in FLOPs per token.
    """
    student, vocab = setup.student, setup.vocab
    linear, head = float(student.linear_params), float(student.hidden_size * vocab)
    attention = _attention_flops(student, setup.max_length)
    lora = float(student.lora_params(setup.lora_rank)) if setup.lora_rank else 0.0
    forward = 2 * linear + 2 * head + attention + 2 * lora
    if setup.training == "full":
        backward = 4 * linear + 4 * head + 2 * attention
    else:
        backward = 2 * linear + 2 * head + 2 * attention + 4 * lora
    recompute = 2 * linear + attention + 2 * lora if setup.gradient_checkpointing else 0.0
    teacher = 0.0
    if setup.teacher_in_process:
        spec = setup.teacher
        assert spec is not None
        teacher = 2.0 * spec.linear_params + 2.0 * spec.hidden_size * vocab + _attention_flops(spec, setup.max_length)
    return {
        "student forward": forward,
        "student backward": backward,
        "recompute": recompute,
        "teacher forward": teacher,
    }


@dataclass(frozen=True)
class Throughput:
    """Predicted speed of a run.

    Attributes:
        flops: FLOPs per trained token by part (see :func:`flops_per_token`).
        student_mfu: utilisation assumed for the student's forward/backward.
        teacher_mfu: utilisation assumed for the teacher's forward.
        generation_seconds_per_token: decoding time per trained token, per GPU (student on-policy and teacher
            ``seq_kd``; 0 when neither generates).
        regather_seconds_per_token: of which a sharded generator's re-gathering of its weights for every new
            token would take (the time of a token is the slower of the two; 0 when no generator is sharded).
        tokens_per_second: trained tokens per second over all GPUs.
        step_seconds: seconds per optimizer step.
    """

    flops: dict[str, float]
    student_mfu: float
    teacher_mfu: float
    generation_seconds_per_token: float
    tokens_per_second: float
    step_seconds: float
    regather_seconds_per_token: float = 0.0

    @property
    def flops_per_token(self) -> float:
        """All FLOPs per trained token (student and teacher)."""
        return sum(self.flops.values())


def _mfus(setup: RunSetup) -> tuple[float, float]:
    if setup.mfu is not None:
        return setup.mfu, setup.mfu
    student = DEFAULT_MFU["fp32" if setup.precision == "fp32" else ("qlora" if setup.qlora else "bf16")]
    teacher = DEFAULT_MFU.get(setup.teacher_mode, DEFAULT_MFU["bf16"])
    return student, teacher


def gather_bandwidth(setup: RunSetup) -> float:
    """Bytes/s one GPU receives in an all-gather over the job: its node's links, or the network when the job spans
    several nodes (a ring over all GPUs is paced by its slowest hop)."""
    link = setup.gpu.link_bandwidth
    return link if setup.nodes == 1 else min(link, INTER_NODE_BANDWIDTH)


def _decode_seconds(
    setup: RunSetup, spec: ModelSpec, weight_bytes: float, element: int, sharded: bool
) -> tuple[float, float]:
    """``(decode, re-gather)`` seconds per new token of one micro-batch: weights + KV cache read from memory, and a
    sharded generator's all-gather of its ``weight_bytes`` (``(W - 1) / W`` of them reach each GPU)."""
    # On average half the sequence is in the cache while decoding.
    kv_bytes = 2 * spec.num_layers * spec.kv_dim * (setup.max_length / 2) * setup.per_device_train_batch_size * element
    decode = (weight_bytes + kv_bytes) / (setup.gpu.memory_bandwidth * DECODE_BANDWIDTH_EFFICIENCY)
    world = setup.world_size
    regather = weight_bytes * (world - 1) / world / gather_bandwidth(setup) if sharded else 0.0
    return decode, regather


def _generation_seconds_per_token(setup: RunSetup) -> tuple[float, float]:
    """Decode time per trained token and GPU (the slower of decoding and re-gathering, per new token), and the
    re-gathering part of it alone: the student on a ``lmbda`` share of steps, the teacher every step (``seq_kd``)."""
    total, regathering = 0.0, 0.0
    generators = []
    if setup.lmbda > 0:
        spec = setup.student
        weight_bytes = (
            spec.linear_params * NF4_BYTES_PER_PARAM + (spec.num_params - spec.linear_params) * 4
            if setup.qlora
            else spec.num_params * setup.compute_bytes
        )
        generators.append((setup.lmbda, spec, weight_bytes, setup.compute_bytes, setup.student_sharded))
    if setup.seq_kd:
        assert setup.teacher is not None
        element = teacher_element_bytes(setup)
        generators.append((1.0, setup.teacher, teacher_whole_bytes(setup)[0], element, setup.teacher_sharded))
    for share, spec, weight_bytes, element, sharded in generators:
        decode, regather = _decode_seconds(setup, spec, weight_bytes, element, sharded)
        per_token = share * setup.max_new_tokens / setup.tokens_per_micro_batch
        total += per_token * max(decode, regather)
        regathering += per_token * regather
    return total, regathering


def estimate_throughput(setup: RunSetup) -> Throughput:
    """Trained tokens per second and seconds per optimizer step for ``setup``.

    Per GPU, seconds per token = student FLOPs / (peak x student MFU) + teacher FLOPs / (peak x
    teacher MFU) + on-policy decoding; all GPUs run in parallel on their own micro-batches.

    Returns:
        A :class:`Throughput` (FLOPs per token, MFUs used, tokens/s over all GPUs, seconds per step).
    """
    flops = flops_per_token(setup)
    student_mfu, teacher_mfu = _mfus(setup)
    peak = setup.gpu.bf16_tflops * 1e12
    student_flops = flops["student forward"] + flops["student backward"] + flops["recompute"]
    generation, regather = _generation_seconds_per_token(setup)
    seconds_per_token = student_flops / (peak * student_mfu) + flops["teacher forward"] / (peak * teacher_mfu)
    seconds_per_token += generation
    tokens_per_second = setup.world_size / seconds_per_token
    return Throughput(
        flops=flops,
        student_mfu=student_mfu,
        teacher_mfu=teacher_mfu,
        generation_seconds_per_token=generation,
        tokens_per_second=tokens_per_second,
        step_seconds=setup.tokens_per_step / tokens_per_second,
        regather_seconds_per_token=regather,
    )


@dataclass(frozen=True)
class Cost:
    """Time and money for a token budget.

    Attributes:
        tokens: trained tokens in total (budget x epochs).
        wall_hours: hours from start to end.
        gpu_hours: ``wall_hours * nodes * num_gpus``.
        usd: ``gpu_hours * hourly_usd``.
        hourly_usd: the price per GPU-hour used.
    """

    tokens: float
    wall_hours: float
    gpu_hours: float
    usd: float
    hourly_usd: float


def estimate_cost(setup: RunSetup, throughput: Throughput) -> Cost | None:
    """Hours and US dollars to train ``tokens * num_train_epochs`` tokens at ``throughput`` (None: no budget)."""
    if setup.tokens is None:
        return None
    tokens = setup.tokens * setup.num_train_epochs
    wall_hours = tokens / throughput.tokens_per_second / 3600
    gpu_hours = wall_hours * setup.world_size
    return Cost(tokens, wall_hours, gpu_hours, gpu_hours * setup.gpu.hourly_usd, setup.gpu.hourly_usd)

"""Generation speed, memory and serving cost of a model on the device it sits on.

Tokens/s is measured on a batch of prompts continued greedily by exactly ``new_tokens`` tokens each
(no early stop, so every model does the same work), after warm-up runs that are not timed. Peak
memory is the caching allocator's ``max_memory_allocated`` on CUDA, and the process's peak resident
set size on a CPU (:class:`distill.evaluation.memory.PeakMemory`, shared with the benchmarks); both
include the weights. Cost per million generated tokens follows from a GPU's hourly price.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from distill.checks import check_float
from distill.evaluation.memory import PeakMemory
from distill.generation.sampling import sample_batch
from distill.models.loading import parameter_bytes

__all__ = ["SpeedResult", "cost_per_million_tokens", "gpu_price_per_hour", "measure_speed", "resolve_price"]

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "The capital of France is",
    "Write a function that returns the sum of a list of numbers.",
    "Explain why the sky is blue in one sentence.",
)


@dataclass(frozen=True)
class SpeedResult:
    """How fast and how large a model is when generating.

    Attributes:
        tokens_per_s: generated tokens per second, summed over the batch (timed runs only).
        parameter_bytes: bytes of parameters and buffers (:func:`distill.models.parameter_bytes`).
        peak_memory_bytes: peak bytes during the timed generation: CUDA allocated memory, or the
            process's resident set size on a CPU (weights included); None when it cannot be read.
        device: where the model ran, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: prompts generated together.
        new_tokens: tokens generated per prompt and run.
        seconds: wall-clock seconds of the timed runs.
        price_per_hour: USD per hour of the device, if known.
    """

    tokens_per_s: float
    parameter_bytes: int
    peak_memory_bytes: int | None
    device: str
    batch_size: int
    new_tokens: int
    seconds: float
    price_per_hour: float | None = None

    @property
    def cost_per_million_tokens(self) -> float | None:
        """USD per million generated tokens at ``price_per_hour``, or None without a price."""
        if self.price_per_hour is None:
            return None
        return cost_per_million_tokens(self.price_per_hour, self.tokens_per_s)

    def as_dict(self) -> dict[str, Any]:
        """Every field plus ``cost_per_million_tokens``, for JSON."""
        return {**asdict(self), "cost_per_million_tokens": self.cost_per_million_tokens}


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float) -> float:
    """USD per million generated tokens: ``price_per_hour / (tokens_per_s * 3600) * 1e6``.

    Args:
        price_per_hour: USD per hour of the device.
        tokens_per_s: generated tokens per second on it (> 0).
    """
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be > 0; got {tokens_per_s}.")
    return price_per_hour / (tokens_per_s * 3600.0) * 1e6


def gpu_price_per_hour(gpu: str) -> float:
    """USD per hour of ``gpu`` (e.g. ``"H100"``, ``"a100-80"``) from ``distill.planning``'s GPU catalogue.

    Raises:
        ValueError: the catalogue does not know ``gpu`` (or several entries match); the message lists
            the catalogue and says to pass a price per hour instead.
    """
    from distill.planning import get_gpu

    try:
        return float(get_gpu(gpu).hourly_usd)
    except KeyError as error:
        raise ValueError(
            f"{error.args[0] if error.args else error} Pass the price in USD per hour instead "
            "(--price-per-hour / price_per_hour=)."
        ) from None


def resolve_price(price_per_hour: float | None = None, gpu: str | None = None) -> float | None:
    """The device's USD per hour: ``price_per_hour`` if given, else ``gpu`` looked up, else None."""
    if price_per_hour is not None:
        return check_float(price_per_hour, "price_per_hour (USD)", minimum=0)
    return gpu_price_per_hour(gpu) if gpu else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    new_tokens: int = 64,
    warmup: int = 1,
    repeats: int = 1,
    price_per_hour: float | None = None,
    gpu: str | None = None,
) -> SpeedResult:
    """Time greedy generation of exactly ``new_tokens`` tokens for a batch of prompts.

    Args:
        model: a causal LM on the device to measure.
        tokenizer: its tokenizer.
        prompts: texts to continue; cycled to fill ``batch_size`` (default: four short built-in prompts).
        batch_size: prompts per generation call.
        new_tokens: tokens generated per prompt (no eos stop).
        warmup: untimed runs first (kernel selection, allocator warm-up, lazy initialisation).
        repeats: timed runs; tokens/s is their total tokens over their total time.
        price_per_hour: USD per hour of the device, for :attr:`SpeedResult.cost_per_million_tokens`.
        gpu: or a GPU name to look its price up in ``distill.planning`` (:func:`gpu_price_per_hour`).

    Returns:
        The :class:`SpeedResult`.
    """
    if batch_size < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size, new_tokens and repeats must be >= 1, warmup >= 0.")
    price = resolve_price(price_per_hour, gpu)
    texts = list(prompts or DEFAULT_PROMPTS)
    prompt_ids = [list(tokenizer(texts[i % len(texts)])["input_ids"]) for i in range(batch_size)]
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def generate() -> None:
        # Greedy needs no generator draws; eos_token_ids=() keeps every row going for exactly new_tokens.
        generators = [torch.Generator() for _ in prompt_ids]
        sample_batch(
            model, prompt_ids, generators, max_new_tokens=new_tokens, eos_token_ids=(), pad_token_id=pad, temperature=0
        )

    try:
        for _ in range(warmup):
            generate()
        memory = PeakMemory(device)
        memory.start()
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            generate()
        _synchronize(device)
        seconds = time.perf_counter() - start
        peak = memory.peak()
    finally:
        model.train(was_training)
    return SpeedResult(
        tokens_per_s=batch_size * new_tokens * repeats / max(seconds, 1e-9),
        parameter_bytes=parameter_bytes(model),
        peak_memory_bytes=peak,
        device=str(device),
        batch_size=batch_size,
        new_tokens=new_tokens,
        seconds=seconds,
        price_per_hour=price,
    )

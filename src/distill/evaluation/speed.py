"""Generation speed, memory and serving cost of a model on the device it sits on.

Tokens/s is measured on a batch of prompts continued greedily by exactly ``new_tokens`` tokens each
(no early stop, so every model does the same work), after warm-up runs that are not timed, and
``repeats`` times: the result keeps every run's rate, reports their median, and the spread says how
far one run is from the next (a single run on a shared machine can be off by 10x). Memory is the
model's own: its weights (:func:`distill.models.parameter_bytes`) plus the activations measured while
it generates (the rise above the memory in use before the timed runs: ``max_memory_allocated`` on CUDA,
the peak resident set size on a CPU; :class:`distill.evaluation.memory.PeakMemory`), so other models
and the rest of the process do not count. Cost per million generated tokens follows from a GPU's
hourly price.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.checks import check_float
from distill.evaluation.memory import PeakMemory
from distill.evaluation.stats import Spread, spread
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
        tokens_per_s: generated tokens per second, summed over the batch: the median of the timed runs.
        parameter_bytes: bytes of parameters and buffers (:func:`distill.models.parameter_bytes`).
        peak_memory_bytes: the model's own peak memory while generating: ``parameter_bytes`` plus
            ``activation_bytes``; None when the device reports no memory.
        device: where the model ran, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: prompts generated together.
        new_tokens: tokens generated per prompt and run.
        seconds: wall-clock seconds of all timed runs together.
        price_per_hour: USD per hour of the device, if known.
        run_tokens_per_s: tokens/s of each timed run, in the order they ran.
        activation_bytes: peak rise of the device's memory during the timed runs above what was in use
            before them (CUDA: allocated bytes; CPU: resident set size), i.e. activations, KV cache and
            temporaries; None when unreadable.
    """

    tokens_per_s: float
    parameter_bytes: int
    peak_memory_bytes: int | None
    device: str
    batch_size: int
    new_tokens: int
    seconds: float
    price_per_hour: float | None = None
    run_tokens_per_s: tuple[float, ...] = ()
    activation_bytes: int | None = None

    @property
    def spread(self) -> Spread:
        """Median, min, max and quartiles of the timed runs' tokens/s."""
        return spread(self.run_tokens_per_s or (self.tokens_per_s,))

    @property
    def cost_per_million_tokens(self) -> float | None:
        """USD per million generated tokens at ``price_per_hour``, or None without a price."""
        if self.price_per_hour is None:
            return None
        return cost_per_million_tokens(self.price_per_hour, self.tokens_per_s)

    def as_dict(self) -> dict[str, Any]:
        """Every field plus ``cost_per_million_tokens`` and the runs' spread, for JSON."""
        runs = self.spread
        return {
            **asdict(self),
            "run_tokens_per_s": list(self.run_tokens_per_s),
            "tokens_per_s_min": runs.low,
            "tokens_per_s_max": runs.high,
            "tokens_per_s_iqr": [runs.q1, runs.q3],
            "cost_per_million_tokens": self.cost_per_million_tokens,
        }


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
    repeats: int = 5,
    price_per_hour: float | None = None,
    gpu: str | None = None,
    progress: bool = True,
) -> SpeedResult:
    """Time greedy generation of exactly ``new_tokens`` tokens for a batch of prompts.

    Args:
        model: a causal LM on the device to measure.
        tokenizer: its tokenizer.
        prompts: texts to continue; cycled to fill ``batch_size`` (default: four short built-in prompts).
        batch_size: prompts per generation call.
        new_tokens: tokens generated per prompt (no eos stop).
        warmup: untimed runs first (kernel selection, allocator warm-up, lazy initialisation).
        repeats: timed runs, each timed on its own; tokens/s is their median, and the result keeps them all.
        price_per_hour: USD per hour of the device, for :attr:`SpeedResult.cost_per_million_tokens`.
        gpu: or a GPU name to look its price up in ``distill.planning`` (:func:`gpu_price_per_hour`).
        progress: show a bar of the runs (warm-up and timed; rate and ETA).

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

    run_seconds = []
    bar = tqdm(total=warmup + repeats, desc="Timing generation", unit="run", disable=not progress)
    try:
        for _ in range(warmup):
            generate()
            bar.update()
        memory = PeakMemory(device)
        memory.start()
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            generate()
            _synchronize(device)  # host-device sync: the GPU's work must be done before the clock stops
            run_seconds.append(time.perf_counter() - start)
            bar.update()  # after the clock stopped: drawing the bar is not timed
        peak = memory.peak()
    finally:
        bar.close()
        model.train(was_training)
    runs = tuple(batch_size * new_tokens / max(seconds, 1e-9) for seconds in run_seconds)
    weights = parameter_bytes(model)
    activations = max(peak - memory.baseline, 0) if peak is not None and memory.resettable else None
    return SpeedResult(
        tokens_per_s=spread(runs).median,
        parameter_bytes=weights,
        peak_memory_bytes=weights + activations if activations is not None else None,
        device=str(device),
        batch_size=batch_size,
        new_tokens=new_tokens,
        seconds=sum(run_seconds),
        price_per_hour=price,
        run_tokens_per_s=runs,
        activation_bytes=activations,
    )

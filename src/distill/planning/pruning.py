"""What a pruning pass (``distill.pruning``) costs: memory for the teacher and its statistics, and time.

The pass is one no-grad forward of the teacher over the calibration tokens, with hooks that accumulate
float32 Gram matrices of every prunable linear map's input, then one least-squares re-fit and one
scoring forward per candidate shape. The Gram matrices, not the activations, are what grows fastest
with model size: ``layers x (intermediate^2 + 2 hidden^2 + q_dim^2)`` numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.planning.models import ModelSpec

__all__ = ["PruningCost", "pruning_cost"]

_GIB = 1024**3


@dataclass(frozen=True)
class PruningCost:
    """Memory (bytes) and work (FLOPs) of a pruning pass.

    Attributes:
        teacher_bytes: the teacher's weights in the dtype it is pruned in.
        gram_bytes: the float32 input statistics the re-fit needs (0 without the re-fit).
        activation_bytes: the largest live activations of one calibration forward (the logits of a batch).
        calibration_flops: the forward over the calibration tokens plus the Gram updates.
        refit_flops: the least-squares solves of one candidate shape (upper bound: every map re-fitted).
    """

    teacher_bytes: int
    gram_bytes: int
    activation_bytes: int
    calibration_flops: float
    refit_flops: float

    @property
    def peak_bytes(self) -> int:
        """Teacher + statistics + one batch's activations (a pruned candidate adds at most one more teacher)."""
        return 2 * self.teacher_bytes + self.gram_bytes + self.activation_bytes

    def summary(self) -> str:
        return (
            f"pruning pass: teacher {self.teacher_bytes / _GIB:.1f} GiB + statistics {self.gram_bytes / _GIB:.1f} GiB "
            f"+ activations {self.activation_bytes / _GIB:.1f} GiB (peak ~{self.peak_bytes / _GIB:.1f} GiB with one "
            f"candidate); {self.calibration_flops / 1e12:.0f} TFLOP calibration, {self.refit_flops / 1e12:.1f} TFLOP "
            "per candidate re-fit"
        )


def pruning_cost(
    spec: ModelSpec,
    *,
    calibration_tokens: int,
    batch_tokens: int,
    dtype_bytes: int = 2,
    refit: bool = True,
) -> PruningCost:
    """Memory and FLOPs of pruning ``spec`` on ``calibration_tokens`` tokens in batches of ``batch_tokens``.

    Args:
        spec: the teacher's shape.
        calibration_tokens: tokens of the calibration rows (e.g. 256 rows x 512).
        batch_tokens: tokens per forward (rows per batch x row length).
        dtype_bytes: bytes per teacher weight (2 for bf16, 4 for fp32).
        refit: with the least-squares re-fit (its Gram matrices); without, only per-unit sums.
    """
    h, i, q = spec.hidden_size, spec.intermediate_size, spec.q_dim
    gram_numbers = spec.num_layers * (i * i + 2 * h * h + q * q) if refit else spec.num_layers * (i + 4 * h + q)
    logits = batch_tokens * spec.vocab_size * 4  # float32 logits of one batch (the calibration loss)
    forward = 2 * spec.num_params * calibration_tokens
    grams = 2 * calibration_tokens * gram_numbers if refit else 0
    # A solve of a k x k system with r right-hand sides: k^3 / 3 + 2 k^2 r, per re-fitted map (k <= its input width).
    solves = spec.num_layers * (
        (i**3 / 3 + 2 * i * i * h) + (q**3 / 3 + 2 * q * q * h) + 5 * (h**3 / 3 + 2 * h * h * max(i, q))
    )
    return PruningCost(
        teacher_bytes=spec.num_params * dtype_bytes,
        gram_bytes=gram_numbers * 4,
        activation_bytes=logits,
        calibration_flops=float(forward + grams),
        refit_flops=float(solves) if refit else 0.0,
    )

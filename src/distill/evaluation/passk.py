"""The unbiased pass@k estimator of the Codex paper (https://arxiv.org/abs/2107.03374), section 2.1.

Sampling ``n >= k`` completions per problem and counting the ``c`` that pass gives an unbiased
estimate of the chance that at least one of ``k`` samples passes::

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomials overflow floats for large ``n``; the paper's product form is used instead::

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["mean_pass_at_k", "pass_at_k", "per_problem_pass_at_k"]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem, as a probability in [0, 1].

    Args:
        num_samples: ``n``, completions sampled for the problem.
        num_correct: ``c``, how many of them passed the tests (``0 <= c <= n``).
        k: samples the user would draw (``1 <= k <= n``).

    Returns:
        ``1 - C(n - c, k) / C(n, k)``: 1.0 when fewer than ``k`` samples failed, 0.0 when none passed.

    Raises:
        ValueError: ``c`` outside ``[0, n]`` or ``k`` outside ``[1, n]``.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be in [0, num_samples={num_samples}]; got {num_correct}.")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, num_samples={num_samples}]; got {k}.")
    if num_samples - num_correct < k:
        return 1.0  # every draw of k samples holds a correct one
    all_fail = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        all_fail *= 1.0 - k / i
    return 1.0 - all_fail


def per_problem_pass_at_k(
    num_correct: Sequence[int], num_samples: int | Sequence[int], ks: Sequence[int]
) -> dict[str, list[float]]:
    """pass@k of each problem, for each ``k`` no larger than the samples of every problem.

    Args:
        num_correct: per problem, how many samples passed.
        num_samples: samples per problem: one number for all, or one per problem.
        ks: the ``k`` values wanted; those larger than the smallest ``num_samples`` are left out
            (pass@k is not defined from fewer than ``k`` samples).

    Returns:
        ``{"pass@k": [pass@k of each problem]}`` per kept ``k``, in ascending ``k``; empty without problems.
        These per-problem scores are what a confidence interval over problems resamples.
    """
    counts = list(num_correct)
    samples = [num_samples] * len(counts) if isinstance(num_samples, int) else list(num_samples)
    if len(samples) != len(counts):
        raise ValueError(f"num_samples has {len(samples)} entries for {len(counts)} problems.")
    if not counts:
        return {}
    fewest = min(samples)
    return {
        f"pass@{k}": [pass_at_k(n, c, k) for n, c in zip(samples, counts, strict=True)]
        for k in sorted(set(ks))
        if 1 <= k <= fewest
    }


def mean_pass_at_k(
    num_correct: Sequence[int], num_samples: int | Sequence[int], ks: Sequence[int]
) -> dict[str, float]:
    """pass@k averaged over problems: the mean of :func:`per_problem_pass_at_k` (same arguments, same kept ``k``).

    Returns:
        ``{"pass@k": mean over problems}`` per kept ``k``, in ascending ``k``; empty without problems.
    """
    per_problem = per_problem_pass_at_k(num_correct, num_samples, ks)
    return {key: sum(values) / len(values) for key, values in per_problem.items()}

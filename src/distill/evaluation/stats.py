"""How sure a comparison is: paired bootstrap intervals over held-out rows, and the spread of repeated timings.

A report that says "KD better" must be able to say by how much and how sure: a difference of 0.002 in
top-1 agreement over 8 rows is noise. Two students scored on the same rows are compared with a
*paired* bootstrap: rows are resampled with replacement (the same rows for both models), each metric is
recomputed as the token-weighted mean over the resampled rows (as :func:`heldout_metrics` computes it:
sums over rows divided by tokens), and the 2.5th and 97.5th percentiles of the difference are the 95%
interval. An interval that holds 0 means "no clear difference". Efron & Tibshirani, *An Introduction to
the Bootstrap* (1993), ch. 13 (percentile intervals) and ch. 16 (paired designs).

Task scores such as pass@k have one score per problem, each problem weighing the same: they are compared
the same way with problems as the resampling unit (:func:`paired_score_difference`), and one model's
score gets a percentile interval of its mean over resampled problems (:func:`mean_interval`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Difference",
    "Interval",
    "Spread",
    "mean_interval",
    "paired_difference",
    "paired_score_difference",
    "spread",
]

# Per-row sums a metric is a ratio of: numerator key -> how the token-weighted mean becomes the metric.
_TRANSFORMS = {"ce": "ce", "kl": "kl", "top1_agreement": "top1_agreement", "perplexity": "ce"}


@dataclass(frozen=True)
class Difference:
    """``a - b`` on one metric, with its 95% paired-bootstrap interval.

    Attributes:
        metric: the metric's name (``ce``, ``kl``, ``top1_agreement``, ``perplexity``).
        difference: the observed ``a - b`` on all rows.
        low: 2.5th percentile of the bootstrap differences.
        high: 97.5th percentile.
        num_rows: rows (or problems, see ``unit``) both models were scored on: the resampling unit.
        num_tokens: scored tokens in those rows; 0 for per-problem task scores, which weigh problems equally.
        resamples: bootstrap resamples drawn.
        unit: what a row is: ``"rows"`` (held-out rows) or ``"problems"`` (task problems).
    """

    metric: str
    difference: float
    low: float
    high: float
    num_rows: int
    num_tokens: int
    resamples: int
    unit: str = "rows"

    @property
    def clear(self) -> bool:
        """Whether the interval excludes 0 (the sign of the difference is not noise at the 95% level)."""
        return self.low > 0 or self.high < 0


def _value(metric: str, sums: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    mean = sums / tokens.clamp_min(1)
    return mean.exp() if metric == "perplexity" else mean


def paired_difference(
    a_rows: Mapping[str, Sequence[float]],
    b_rows: Mapping[str, Sequence[float]],
    metric: str,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Difference:
    """``metric(a) - metric(b)`` over the same rows, with a 95% paired-bootstrap percentile interval.

    Args:
        a_rows: per-row sums of model ``a``: ``"tokens"`` (scored tokens per row) and the metric's sum
            per row (``"ce"``, ``"kl"``, ``"top1_agreement"``; ``perplexity`` uses ``"ce"``), each ``[rows]``.
        b_rows: the same for model ``b``, on the same rows in the same order.
        metric: which metric to compare.
        resamples: bootstrap resamples (2000 gives the 2.5/97.5 percentiles to about +-0.1 of their spread).
        seed: the resampling seed (the same seed gives the same interval).

    Returns:
        The :class:`Difference`.

    Raises:
        ValueError: unknown metric, or the two models were not scored on the same rows and tokens.
    """
    if metric not in _TRANSFORMS:
        raise ValueError(f"no per-row form of {metric!r}; known: {sorted(_TRANSFORMS)}")
    key = _TRANSFORMS[metric]
    tokens = torch.tensor(a_rows["tokens"], dtype=torch.float64)
    if len(b_rows["tokens"]) != len(tokens) or not torch.equal(
        tokens, torch.tensor(b_rows["tokens"], dtype=torch.float64)
    ):
        raise ValueError("the two models were not scored on the same rows (per-row token counts differ)")
    a_sums = torch.tensor(a_rows[key], dtype=torch.float64)
    b_sums = torch.tensor(b_rows[key], dtype=torch.float64)
    observed, low, high, drawn = _paired_bootstrap(metric, a_sums, b_sums, tokens, resamples, seed)
    return Difference(metric, observed, low, high, len(tokens), int(tokens.sum()), drawn)


def paired_score_difference(
    a_scores: Sequence[float], b_scores: Sequence[float], metric: str, *, resamples: int = 2000, seed: int = 0
) -> Difference:
    """``mean(a) - mean(b)`` of per-problem task scores (e.g. pass@k), with a 95% paired-bootstrap interval.

    Every problem weighs the same (as in the mean pass@k over problems); problems are resampled with
    replacement, the same problems for both models.

    Args:
        a_scores: model ``a``'s score on each problem, ``[problems]`` (pass@k of a problem is in [0, 1]).
        b_scores: model ``b``'s scores on the same problems, in the same order.
        metric: the metric's name, carried into the :class:`Difference`.
        resamples: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        The :class:`Difference`, with ``unit="problems"`` and ``num_tokens=0``.

    Raises:
        ValueError: the two lists differ in length (not scored on the same problems).
    """
    if len(a_scores) != len(b_scores):
        raise ValueError(f"the two models were scored on {len(a_scores)} and {len(b_scores)} problems")
    a = torch.tensor(list(a_scores), dtype=torch.float64)
    b = torch.tensor(list(b_scores), dtype=torch.float64)
    observed, low, high, drawn = _paired_bootstrap(metric, a, b, torch.ones_like(a), resamples, seed)
    return Difference(metric, observed, low, high, len(a), 0, drawn, unit="problems")


def _paired_bootstrap(
    metric: str, a_sums: torch.Tensor, b_sums: torch.Tensor, weights: torch.Tensor, resamples: int, seed: int
) -> tuple[float, float, float, int]:
    """Observed difference of weighted means, its 2.5/97.5 percentiles and the resamples drawn (0 below 2 units)."""
    observed = float(_value(metric, a_sums.sum(), weights.sum()) - _value(metric, b_sums.sum(), weights.sum()))
    units = len(weights)
    if units < 2:
        return observed, -math.inf, math.inf, 0
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(units, (resamples, units), generator=generator)  # [resamples, units], unit indices
    picked = weights[picks].sum(1)
    diffs = _value(metric, a_sums[picks].sum(1), picked) - _value(metric, b_sums[picks].sum(1), picked)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return observed, low, high, resamples


@dataclass(frozen=True)
class Interval:
    """A mean over units with its 95% bootstrap percentile interval.

    Attributes:
        mean: the mean over all units.
        low: 2.5th percentile of the resampled means.
        high: 97.5th percentile.
        count: units (e.g. problems) the mean is over.
    """

    mean: float
    low: float
    high: float
    count: int

    def text(self, digits: int = 4) -> str:
        """``"0.3100 [0.2000, 0.4200], n=50"``; without an interval below 2 units."""
        if self.count < 2:
            return f"{self.mean:.{digits}f} (n={self.count})"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}], n={self.count}"


def mean_interval(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per unit, e.g. pass@k per problem) with a 95% bootstrap percentile interval.

    With fewer than 2 values the interval is (-inf, inf): one problem says nothing about the spread.
    """
    if not values:
        raise ValueError("mean_interval() needs at least one value")
    scores = torch.tensor(list(values), dtype=torch.float64)
    # The paired bootstrap against a model scoring 0 everywhere: its differences are the resampled means.
    mean, low, high, _ = _paired_bootstrap("mean", scores, torch.zeros_like(scores), torch.ones_like(scores),
                                           resamples, seed)  # fmt: skip
    return Interval(mean, low, high, len(scores))


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one quantity: median, min, max, interquartile range and count."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    count: int

    def text(self, digits: int = 1) -> str:
        """``"123.4 (min-max 110.0-130.2, n=5)"``, or the value alone for one measurement."""
        if self.count == 1:
            return f"{self.median:,.{digits}f} (n=1)"
        return f"{self.median:,.{digits}f} (min-max {self.low:,.{digits}f}-{self.high:,.{digits}f}, n={self.count})"


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (at least one); quartiles by the inclusive method."""
    if not values:
        raise ValueError("spread() needs at least one value")
    ordered = sorted(float(v) for v in values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return Spread(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))

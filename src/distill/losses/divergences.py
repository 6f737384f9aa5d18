"""The divergences between a teacher and a student distribution, written once.

Every function here takes two distributions given as log-probabilities over the same *support*
(the last dimension) and returns one value per token (the support dimension summed out). The
support is the whole vocabulary in the dense and fused forms, and the teacher's top-k tokens (plus,
optionally, one bucket for the tail) in the sparse form: the math is the same, only the support
changes. All values are in nats.

Conventions follow TRL's GKD and Liger so users can switch between them: the teacher is ``P``,
the student is ``Q``; "forward KL" is ``KL(P || Q)`` (mode covering), "reverse KL" is
``KL(Q || P)`` (mode seeking).

Log-probabilities of ``-inf`` (a token or tail bucket with exactly zero mass) are allowed on either
side. A zero-mass entry contributes ``0 * log 0 = 0``; its gradient is kept finite (never NaN) with
the "double where" trick, so the same code serves a full vocabulary and a top-k support whose tail
is empty.

Beside each value sits its closed-form gradient (``*_value_and_grad``): the per-token value and
``g = dD / d(student log-probs)``, the student's log-probabilities taken as free variables (the
caller applies the chain rule through its log-softmax: ``g - q * sum(g)``). These functions serve the
fused loss's chunk body, so with ``finite=True`` (a full vocabulary of finite logits) they work in
place on ``[rows, V]`` buffers: ``student_logprobs`` and ``teacher_logprobs`` are consumed (the
gradient is returned in one of their storages) and only the probabilities survive. With
``finite=False`` (a top-k support, small) they allocate and guard the zero-mass entries as the values
do, giving the same gradients as autograd through the "double where" values.

The finite forms of the mixture divergences are written in terms of ``d = log q - log p`` (one
buffer) rather than the mixture's log ``m`` (another one): ``m - log p = log(beta + (1 - beta) e^d)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_NAMES",
    "Divergence",
    "forward_kl_per_token",
    "forward_kl_value_and_grad",
    "generalized_jsd_per_token",
    "generalized_jsd_value_and_grad",
    "reverse_kl_per_token",
    "reverse_kl_value_and_grad",
    "skew_kl_per_token",
    "skew_kl_value_and_grad",
    "skew_reverse_kl_per_token",
    "skew_reverse_kl_value_and_grad",
    "total_variation_per_token",
    "total_variation_value_and_grad",
]

ValueAndGrad = tuple[Tensor, Tensor]


def _log_mix_offset(d: Tensor, log_weight: float, log_other_weight: float, out: Tensor) -> Tensor:
    """``out = log(exp(log_weight) + exp(log_other_weight + d))``: a mixture's log relative to one side."""
    torch.add(d, log_other_weight, out=out)
    return torch.logaddexp(out, out.new_tensor(log_weight), out=out)


def row_sum_of_product(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b, -1)``; for ``[n, V]`` inputs a batched dot product, which writes no ``[n, V]`` product."""
    if a.dim() == 2:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return (a * b).sum(-1)


def _scaled(grad: Tensor, scale: float) -> Tensor:
    """``grad * scale`` in place (skipped for 1)."""
    return grad if scale == 1.0 else grad.mul_(scale)


def _zero_where(values: Tensor, mask: Tensor | None) -> Tensor:
    """``values`` with the entries where ``mask`` is True set to 0 (in place); no-op for no mask."""
    return values if mask is None else values.masked_fill_(mask, 0.0)


def _empty(logprobs: Tensor, finite: bool) -> Tensor | None:
    """Where ``logprobs`` is ``-inf`` (zero mass), or ``None`` when ``finite`` promises there is none."""
    return None if finite else logprobs == -math.inf


def _plogp_ratio(p_logprobs: Tensor, q_logprobs: Tensor, finite: bool) -> Tensor:
    """Elementwise ``p * (log p - log q)``, with ``0 * (...) = 0`` where ``p == 0``.

    With ``finite=False``, entries where ``p_logprobs == -inf`` give exactly 0 and a zero (not NaN)
    gradient: the inputs of the unselected branch are replaced by finite values before any
    arithmetic. ``finite=True`` promises there are no ``-inf`` entries and skips that work.
    """
    if finite:
        return p_logprobs.exp() * (p_logprobs - q_logprobs)
    has_mass = p_logprobs > -math.inf
    safe_p = torch.where(has_mass, p_logprobs, torch.zeros_like(p_logprobs))
    safe_q = torch.where(has_mass, q_logprobs, torch.zeros_like(q_logprobs))
    terms = safe_p.exp() * (safe_p - safe_q)
    return torch.where(has_mass, terms, torch.zeros_like(terms))


def _log_mixture(a_logprobs: Tensor, a_weight: float, b_logprobs: Tensor, finite: bool) -> Tensor:
    """``log(a_weight * exp(a) + (1 - a_weight) * exp(b))`` elementwise, for 0 < a_weight < 1.

    With ``finite=False``, entries where both inputs are ``-inf`` give ``-inf`` with a finite gradient.
    """
    a_shifted = a_logprobs + math.log(a_weight)
    b_shifted = b_logprobs + math.log1p(-a_weight)
    if finite:
        return torch.logaddexp(a_shifted, b_shifted)
    larger = torch.maximum(a_shifted, b_shifted)
    both_empty = larger == -math.inf
    larger_safe = torch.where(both_empty, torch.zeros_like(larger), larger)
    smaller_minus_larger = torch.minimum(a_shifted, b_shifted) - larger_safe
    mixed = larger_safe + torch.log1p(smaller_minus_larger.exp())
    return torch.where(both_empty, torch.full_like(mixed, -math.inf), mixed)


def forward_kl_per_token(student_logprobs: Tensor, teacher_logprobs: Tensor, finite: bool = False) -> Tensor:
    """Forward KL, ``KL(P_teacher || Q_student) = sum_v p_v (log p_v - log q_v)``.

    Args:
        student_logprobs: ``[..., support]`` student log-probabilities.
        teacher_logprobs: ``[..., support]`` teacher log-probabilities.
        finite: promise that no entry is ``-inf`` (true for a softmax of finite logits), which skips
            the zero-mass handling; leave False for supports that may hold an empty bucket.

    Returns:
        ``[...]`` divergence per token, in nats.
    """
    return _plogp_ratio(teacher_logprobs, student_logprobs, finite).sum(-1)


def forward_kl_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """Forward KL and ``g = -p`` (the student's ``q`` enters through the caller's chain rule: ``q - p``).

    Args:
        student_logprobs, teacher_logprobs: ``[..., support]``; consumed (used as scratch).
        student_probs, teacher_probs: their exponentials ``q`` and ``p``, left unchanged.
        finite: no ``-inf`` entries (see :func:`forward_kl_per_token`).
        scale: multiplies ``g`` (folded into its last pass; the value is not scaled).

    Returns:
        ``([...] values in nats, [..., support] scale * g)``, ``g`` in the storage of one of the log-prob
        tensors.
    """
    empty = _empty(teacher_logprobs, finite)
    ratio = _zero_where(teacher_logprobs.sub_(student_logprobs), empty)  # log p - log q, 0 where p = 0
    value = row_sum_of_product(ratio, teacher_probs)
    return value, torch.mul(teacher_probs, -scale, out=student_logprobs)


def reverse_kl_per_token(student_logprobs: Tensor, teacher_logprobs: Tensor, finite: bool = False) -> Tensor:
    """Reverse KL, ``KL(Q_student || P_teacher) = sum_v q_v (log q_v - log p_v)`` (MiniLLM).

    Shapes as in :func:`forward_kl_per_token`.
    """
    return _plogp_ratio(student_logprobs, teacher_logprobs, finite).sum(-1)


def reverse_kl_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """Reverse KL and ``g = q * (log q - log p + 1)``; arguments as in :func:`forward_kl_value_and_grad`."""
    empty = _empty(student_logprobs, finite)
    ratio = _zero_where(student_logprobs.sub_(teacher_logprobs), empty)  # log q - log p, 0 where q = 0
    value = row_sum_of_product(ratio, student_probs)
    grad = torch.addcmul(student_probs, ratio, student_probs, out=teacher_logprobs)
    return value, _scaled(grad, scale)


def generalized_jsd_per_token(
    student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float, finite: bool = False
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (https://arxiv.org/abs/2306.13649).

    With the mixture ``M = beta * P + (1 - beta) * Q``::

        JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)

    As in TRL and Liger, ``beta == 0`` is defined as the forward KL ``KL(P || Q)`` and
    ``beta == 1`` as the reverse KL ``KL(Q || P)`` (the formula itself would give 0 at both ends;
    near them it is ``beta`` times the forward KL, or ``1 - beta`` times the reverse KL).
    ``beta = 0.5`` is the symmetric Jensen-Shannon divergence, bounded by ``log 2``.

    Shapes as in :func:`forward_kl_per_token`.
    """
    if beta == 0.0:
        return forward_kl_per_token(student_logprobs, teacher_logprobs, finite)
    if beta == 1.0:
        return reverse_kl_per_token(student_logprobs, teacher_logprobs, finite)
    mixture_logprobs = _log_mixture(teacher_logprobs, beta, student_logprobs, finite)
    teacher_to_mixture = _plogp_ratio(teacher_logprobs, mixture_logprobs, finite).sum(-1)
    student_to_mixture = _plogp_ratio(student_logprobs, mixture_logprobs, finite).sum(-1)
    return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture


def generalized_jsd_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    beta: float,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """Generalized JSD and ``g = (1 - beta) * q * (log q - log m)``.

    (The terms of ``d log m / d log q`` cancel against the ``+ q`` of ``d (q log q)``.) Arguments as in
    :func:`forward_kl_value_and_grad`.
    """
    if beta == 0.0:
        return forward_kl_value_and_grad(
            student_logprobs, teacher_logprobs, student_probs, teacher_probs, finite, scale=scale
        )
    if beta == 1.0:
        return reverse_kl_value_and_grad(
            student_logprobs, teacher_logprobs, student_probs, teacher_probs, finite, scale=scale
        )
    if not finite:
        value = generalized_jsd_per_token(student_logprobs, teacher_logprobs, beta, finite)
        mixture_logprobs = _log_mixture(teacher_logprobs, beta, student_logprobs, finite)
        student_minus_mixture = _zero_where(student_logprobs - mixture_logprobs, student_logprobs == -math.inf)
        return value, student_minus_mixture.mul_(student_probs).mul_((1.0 - beta) * scale)
    # d = log q - log p; log m - log p = log(beta + (1 - beta) e^d) =: a; log q - log m = d - a.
    # The student's term sum q (d - a) is sum(g) / (1 - beta): no separate product needed.
    d = student_logprobs.sub_(teacher_logprobs)
    a = _log_mix_offset(d, math.log(beta), math.log1p(-beta), out=teacher_logprobs)
    student_term = d.sub_(a).mul_(student_probs)
    value = (1.0 - beta) * student_term.sum(-1) - beta * row_sum_of_product(a, teacher_probs)
    return value, student_term.mul_((1.0 - beta) * scale)


def skew_kl_per_token(
    student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float, finite: bool = False
) -> Tensor:
    """Skew KL of DistiLLM (https://arxiv.org/abs/2402.03898): ``KL(P || alpha * P + (1 - alpha) * Q)``.

    ``alpha == 0`` is the forward KL; a small ``alpha`` (DistiLLM uses 0.1) keeps the student's
    gradient bounded where it gives a teacher token almost no mass.

    Shapes as in :func:`forward_kl_per_token`.
    """
    if alpha == 0.0:
        return forward_kl_per_token(student_logprobs, teacher_logprobs, finite)
    mixture_logprobs = _log_mixture(teacher_logprobs, alpha, student_logprobs, finite)
    return _plogp_ratio(teacher_logprobs, mixture_logprobs, finite).sum(-1)


def skew_kl_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    alpha: float,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """Skew KL and ``g = -(1 - alpha) * p * q / m``; arguments as in :func:`forward_kl_value_and_grad`."""
    if alpha == 0.0:
        return forward_kl_value_and_grad(
            student_logprobs, teacher_logprobs, student_probs, teacher_probs, finite, scale=scale
        )
    if not finite:
        value = skew_kl_per_token(student_logprobs, teacher_logprobs, alpha, finite)
        mixture_logprobs = _log_mixture(teacher_logprobs, alpha, student_logprobs, finite)
        student_over_mixture = _zero_where((student_logprobs - mixture_logprobs).exp_(), teacher_logprobs == -math.inf)
        return value, student_over_mixture.mul_(teacher_probs).mul_((alpha - 1.0) * scale)
    # d = log q - log p; log m - log p = log(alpha + (1 - alpha) e^d) =: a; q / m = e^(d - a).
    d = student_logprobs.sub_(teacher_logprobs)
    a = _log_mix_offset(d, math.log(alpha), math.log1p(-alpha), out=teacher_logprobs)
    grad = d.sub_(a).exp_().mul_(teacher_probs).mul_((alpha - 1.0) * scale)
    return -row_sum_of_product(a, teacher_probs), grad


def skew_reverse_kl_per_token(
    student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float, finite: bool = False
) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(Q || (1 - alpha) * P + alpha * Q)``.

    ``alpha == 0`` is the reverse KL. Shapes as in :func:`forward_kl_per_token`.
    """
    if alpha == 0.0:
        return reverse_kl_per_token(student_logprobs, teacher_logprobs, finite)
    mixture_logprobs = _log_mixture(student_logprobs, alpha, teacher_logprobs, finite)
    return _plogp_ratio(student_logprobs, mixture_logprobs, finite).sum(-1)


def skew_reverse_kl_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    alpha: float,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """Skew reverse KL and ``g = q * (log q - log m + 1 - alpha * q / m)``.

    Arguments as in :func:`forward_kl_value_and_grad`.
    """
    if alpha == 0.0:
        return reverse_kl_value_and_grad(
            student_logprobs, teacher_logprobs, student_probs, teacher_probs, finite, scale=scale
        )
    if not finite:
        value = skew_reverse_kl_per_token(student_logprobs, teacher_logprobs, alpha, finite)
        mixture_logprobs = _log_mixture(student_logprobs, alpha, teacher_logprobs, finite)
        log_ratio = _zero_where(student_logprobs - mixture_logprobs, student_logprobs == -math.inf)
        return value, (log_ratio + 1.0).sub_(log_ratio.exp().mul_(alpha)).mul_(student_probs).mul_(scale)
    # -d = log p - log q; log m - log q = log(alpha + (1 - alpha) e^-d) =: b; log q - log m = -b.
    minus_d = torch.sub(teacher_logprobs, student_logprobs, out=teacher_logprobs)
    b = _log_mix_offset(minus_d, math.log(alpha), math.log1p(-alpha), out=teacher_logprobs)
    grad = torch.neg(b, out=student_logprobs).exp_().mul_(-alpha).sub_(b).add_(1.0).mul_(student_probs)
    return -row_sum_of_product(b, student_probs), _scaled(grad, scale)


def total_variation_per_token(student_logprobs: Tensor, teacher_logprobs: Tensor, finite: bool = False) -> Tensor:
    """Total variation distance, ``0.5 * sum_v |p_v - q_v|``, in [0, 1] (probability units, not nats).

    Its gradient is the sign of ``q - p`` (undefined where they are exactly equal; torch uses 0).
    Shapes as in :func:`forward_kl_per_token`.
    """
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def total_variation_value_and_grad(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_probs: Tensor,
    teacher_probs: Tensor,
    finite: bool,
    scale: float = 1.0,
) -> ValueAndGrad:
    """TVD and its subgradient ``g = 0.5 * q * sign(q - p)`` (0 where ``q == p``, as torch's ``abs``).

    Arguments as in :func:`forward_kl_value_and_grad`; ``g`` is in the storage of ``teacher_logprobs``.
    """
    difference = torch.sub(student_probs, teacher_probs, out=student_logprobs)
    sign = torch.sign(difference, out=teacher_logprobs)
    return 0.5 * difference.abs_().sum(-1), sign.mul_(student_probs).mul_(0.5 * scale)


@dataclass(frozen=True)
class _Formulas:
    """One divergence's two functions and the name of the :class:`Divergence` parameter they take, if any."""

    per_token: Callable[..., Tensor]
    value_and_grad: Callable[..., ValueAndGrad]
    parameter: str | None = None


# The dispatch table: one row per divergence. A name not in it raises (in Divergence and in _formulas), so a new
# divergence cannot fall through to another's math; tests/reference.py must cover every row (tested).
_FORMULAS: dict[str, _Formulas] = {
    "forward_kl": _Formulas(forward_kl_per_token, forward_kl_value_and_grad),
    "reverse_kl": _Formulas(reverse_kl_per_token, reverse_kl_value_and_grad),
    "jsd": _Formulas(generalized_jsd_per_token, generalized_jsd_value_and_grad, "beta"),
    "skew_kl": _Formulas(skew_kl_per_token, skew_kl_value_and_grad, "alpha"),
    "skew_reverse_kl": _Formulas(skew_reverse_kl_per_token, skew_reverse_kl_value_and_grad, "alpha"),
    "tvd": _Formulas(total_variation_per_token, total_variation_value_and_grad),
}
_CANONICAL_NAMES: tuple[str, ...] = tuple(_FORMULAS)
_ALIASES = {
    "kl": "forward_kl",
    "fkl": "forward_kl",
    "rkl": "reverse_kl",
    "generalized_jsd": "jsd",
    "skl": "skew_kl",
    "srkl": "skew_reverse_kl",
    "total_variation": "tvd",
}
DIVERGENCE_NAMES: tuple[str, ...] = _CANONICAL_NAMES + tuple(_ALIASES)
# The canonical names alone, in table order (what a test or a table keyed by divergence iterates over).
DIVERGENCES: tuple[str, ...] = _CANONICAL_NAMES


def _formulas(name: str) -> _Formulas:
    """The table row of a canonical name; any other name raises ``ValueError`` (never a default)."""
    try:
        return _FORMULAS[name]
    except KeyError:
        raise ValueError(
            f"Unknown divergence {name!r}. Choose one of {', '.join(_CANONICAL_NAMES)} "
            f"(aliases: {', '.join(_ALIASES)})."
        ) from None


@dataclass(frozen=True)
class Divergence:
    """A divergence by name with its parameters, validated once and callable per token.

    Attributes:
        name: one of ``forward_kl`` (alias ``kl``, ``fkl``), ``reverse_kl`` (``rkl``), ``jsd``
            (``generalized_jsd``), ``skew_kl`` (``skl``), ``skew_reverse_kl`` (``srkl``), ``tvd``
            (``total_variation``).
        beta: JSD interpolation in [0, 1]; 0 is forward KL, 1 reverse KL. Used by ``jsd`` only.
        alpha: skew in [0, 1) for ``skew_kl`` / ``skew_reverse_kl`` only.
    """

    name: str = "jsd"
    beta: float = 0.5
    alpha: float = 0.1

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.name, self.name)
        _formulas(name)  # an unknown name raises here, naming the choices
        object.__setattr__(self, "name", name)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL); got {self.beta}.")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1) (0 = plain KL); got {self.alpha}.")

    def value_and_grad(
        self,
        student_logprobs: Tensor,
        teacher_logprobs: Tensor,
        student_probs: Tensor,
        teacher_probs: Tensor,
        finite: bool = False,
        scale: float = 1.0,
    ) -> ValueAndGrad:
        """Per-token values ``[...]`` and ``scale * dD / d(student log-probs)`` ``[..., support]``, in closed form.

        Consumes both log-prob tensors (see :func:`forward_kl_value_and_grad`).
        """
        formulas = _formulas(self.name)
        extra = (getattr(self, formulas.parameter),) if formulas.parameter else ()
        return formulas.value_and_grad(
            student_logprobs, teacher_logprobs, student_probs, teacher_probs, *extra, finite, scale
        )

    def __call__(self, student_logprobs: Tensor, teacher_logprobs: Tensor, finite: bool = False) -> Tensor:
        """Divergence per token: ``[..., support]`` log-probs of both sides -> ``[...]``.

        ``finite=True`` promises no ``-inf`` entries (see :func:`forward_kl_per_token`).
        """
        formulas = _formulas(self.name)
        extra = (getattr(self, formulas.parameter),) if formulas.parameter else ()
        return formulas.per_token(student_logprobs, teacher_logprobs, *extra, finite)

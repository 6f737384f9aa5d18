"""An independent float64 reference for the distillation losses, written from the math.

Nothing here imports :mod:`distill.losses`, and the computation deliberately takes another route
than the library: probabilities (not log-probabilities) with explicit sums, masks instead of
``ignore_index`` gathers, ``1 - sum`` / sums over a boolean complement for tail masses. Everything
runs in float64 and is differentiable, so the same functions give reference gradients.

Conventions (as in TRL's GKD and Liger): the teacher is ``P``, the student is ``Q``; the KD term
compares ``softmax(z / T)`` of both sides (no ``T**2`` factor); the CE term is at ``T = 1``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "RefOutput",
    "dense_loss_ref",
    "divergence_ref",
    "head_logits_ref",
    "hidden_loss_ref",
    "softmax_ref",
    "sparse_loss_ref",
]

T_ = TypeVar("T_")

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


class RefOutput(NamedTuple):
    """Reference values; ``loss`` is differentiable, the rest are plain float64 tensors / ints.

    ``min_gap`` is ``min |p - q| / (p + q)`` over the counted positions' supports: how close the
    total variation distance is to a kink (where float32 and float64 may pick different signs).
    """

    loss: Tensor
    kd_loss: Tensor
    ce_loss: Tensor
    top1_agreement: Tensor
    num_tokens: int
    min_gap: float


def softmax_ref(logits: Tensor) -> Tensor:
    """``exp(z_i) / sum_j exp(z_j)`` over the last dim, in float64, shifted by the row max."""
    z = logits.double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values.detach())
    return e / e.sum(dim=-1, keepdim=True)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """``sum_i p_i * (log p_i - log q_i)`` with ``0 * log 0 = 0`` (and a finite gradient there)."""
    has_mass = p > 0
    one = torch.ones_like(p)
    safe_p = torch.where(has_mass, p, one)
    safe_q = torch.where(has_mass, q, one)
    terms = torch.where(has_mass, p * (torch.log(safe_p) - torch.log(safe_q)), torch.zeros_like(p))
    return terms.sum(dim=-1)


def divergence_ref(name: str, p: Tensor, q: Tensor, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """Divergence between teacher probabilities ``p`` and student probabilities ``q``: ``[..., S] -> [...]``.

    ``jsd`` is the generalized JSD of GKD with ``M = beta * P + (1 - beta) * Q``; its endpoints are
    defined, as in TRL and Liger, as forward KL (``beta == 0``) and reverse KL (``beta == 1``).
    """
    p, q = p.double(), q.double()
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        if beta == 0:
            return _kl(p, q)
        if beta == 1:
            return _kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_kl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return _kl(q, (1 - alpha) * p + alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(dim=-1)
    raise ValueError(f"unknown divergence {name!r}")


def head_logits_ref(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """``hidden @ weight[:V].T + bias[:V]`` in float64, then ``cap * tanh(z / cap)`` if ``softcap``."""
    rows = weight.shape[0] if vocab_size is None else vocab_size
    logits = hidden.double() @ weight[:rows].double().T
    if bias is not None:
        logits = logits + bias[:rows].double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _min_gap(p: Tensor, q: Tensor, valid: Tensor) -> float:
    """``min |p - q| / (p + q)`` over the entries of the counted positions (1.0 when there are none)."""
    p, q = p.detach()[valid], q.detach()[valid]
    total = p + q
    gaps = (p - q).abs()[total > 0] / total[total > 0]
    return float(gaps.min()) if gaps.numel() else 1.0


def _reduce(
    kd: Tensor,
    ce: Tensor,
    agree: Tensor,
    valid: Tensor,
    has_labels: bool,
    kd_weight: float,
    ce_weight: float,
    reduction: str,
    min_gap: float,
) -> RefOutput:
    """Combine per-position ``[...]`` values over the positions where ``valid`` is true."""
    weight = valid.double()
    per_position = torch.where(valid, kd_weight * kd + ce_weight * ce, 0.0)
    count = int(valid.sum())
    total = per_position.sum()
    if reduction == "mean":
        loss = total / count if count else total * 0.0
    elif reduction == "sum":
        loss = total
    elif reduction == "none":
        loss = per_position
    else:
        raise ValueError(reduction)
    denominator = max(count, 1)
    kd_mean = torch.where(valid, kd, 0.0).sum().detach() / denominator
    ce_mean = torch.where(valid, ce, 0.0).sum().detach() / denominator if has_labels else torch.tensor(float("nan"))
    agreement = (agree * weight).sum() / denominator
    return RefOutput(loss, kd_mean, ce_mean, agreement, count, min_gap)


def _ce_and_valid(student_logits: Tensor, labels: Tensor | None, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``-log softmax(z)[label]`` at T = 1 (0 where masked) and the mask of counted positions."""
    leading = student_logits.shape[:-1]
    if labels is None:
        return torch.zeros(leading, dtype=torch.float64), torch.ones(leading, dtype=torch.bool)
    valid = labels != ignore_index
    probs = softmax_ref(student_logits)
    one_hot = torch.zeros_like(probs, dtype=torch.bool)
    one_hot[valid] = torch.nn.functional.one_hot(labels[valid], probs.shape[-1]).bool()
    label_prob = (probs * one_hot).sum(dim=-1)
    ce = torch.where(valid, -torch.log(torch.where(valid, label_prob, torch.ones_like(label_prob))), 0.0)
    return ce, valid


def dense_loss_ref(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    name: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> RefOutput:
    """``kd_weight * D(softmax(t / T), softmax(s / T)) + ce_weight * CE(s, label)``, reduced over labelled positions.

    Both logits are restricted to their first ``vocab_size`` columns. With ``labels=None`` every
    position counts and there is no CE term.
    """
    vocab = student_logits.shape[-1] if vocab_size is None else vocab_size
    s = student_logits[..., :vocab].double()
    t = teacher_logits[..., :vocab].double().detach()
    p = softmax_ref(t / temperature)
    q = softmax_ref(s / temperature)
    kd = divergence_ref(name, p, q, beta, alpha)
    ce, valid = _ce_and_valid(s, labels, ignore_index)
    agree = (s.argmax(-1) == t.argmax(-1)).double()
    gap = _min_gap(p, q, valid)
    return _reduce(kd, ce, agree, valid, labels is not None, kd_weight, ce_weight, reduction, gap)


def sparse_loss_ref(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    tail_mass: Tensor | None,
    labels: Tensor | None,
    name: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    tail: str = "bucket",
) -> RefOutput:
    """The loss against a top-k teacher (``ids`` / ``teacher_logprobs`` ``[..., k]``).

    ``bucket`` (T = 1 only): distributions over the k ids plus one "other" outcome; the teacher's
    is ``exp(logprobs)`` plus ``tail_mass`` (or ``1 - sum``), the student's is its full softmax at
    the ids plus the sum of its softmax over every other token. When the ids cover the whole
    vocabulary there is no "other" outcome. ``renormalize``: ``softmax(logprobs / T)`` against
    ``softmax(s[ids] / T)``, both over the k ids only.
    """
    vocab = student_logits.shape[-1] if vocab_size is None else vocab_size
    s = student_logits[..., :vocab].double()
    lp = teacher_logprobs.double().detach()
    if tail == "renormalize":
        p = softmax_ref(lp / temperature)
        q = softmax_ref(torch.gather(s, -1, ids) / temperature)
    elif tail == "bucket":
        assert temperature == 1.0, "the bucket tail is only defined at T = 1"
        q_full = softmax_ref(s)
        p_top = torch.exp(lp)
        q_top = torch.gather(q_full, -1, ids)
        if ids.shape[-1] == vocab:
            p, q = p_top, q_top
        else:
            outside = torch.ones_like(q_full, dtype=torch.bool).scatter(-1, ids, False)
            q_rest = (q_full * outside).sum(dim=-1, keepdim=True)
            p_rest = (1.0 - p_top.sum(dim=-1) if tail_mass is None else tail_mass.double()).unsqueeze(-1)
            p, q = torch.cat([p_top, p_rest], dim=-1), torch.cat([q_top, q_rest], dim=-1)
    else:
        raise ValueError(tail)
    kd = divergence_ref(name, p, q, beta, alpha)
    ce, valid = _ce_and_valid(s, labels, ignore_index)
    teacher_top1 = torch.gather(ids, -1, lp.argmax(-1, keepdim=True)).squeeze(-1)
    agree = (s.argmax(-1) == teacher_top1).double()
    gap = _min_gap(p, q, valid)
    return _reduce(kd, ce, agree, valid, labels is not None, kd_weight, ce_weight, reduction, gap)


def hidden_loss_ref(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    mask: Tensor | None,
    kind: str,
    layer_weights: Sequence[float] | None = None,
) -> Tensor:
    """The hidden-state loss in float64, token by token through a 0/1 weight (no row gathering).

    ``cosine``: mean over kept tokens of ``1 - <s, t> / (|s| |t|)``. ``mse``: mean over kept tokens of
    ``|s - t|^2``, divided by the mean over kept tokens of ``|t|^2``. Then the weighted mean over layers;
    0 when no token is kept.
    """
    per_layer = []
    for student, teacher in zip(student_states, teacher_states, strict=True):
        s, t = student.double(), teacher.detach().double()
        keep = torch.ones(s.shape[:-1], dtype=torch.float64) if mask is None else mask.double()
        count = keep.sum()
        if count == 0:
            per_layer.append((s * 0.0).sum())
            continue
        if kind == "cosine":
            cos = (s * t).sum(-1) / (torch.sqrt((s * s).sum(-1)) * torch.sqrt((t * t).sum(-1)))
            per_layer.append(((1.0 - cos) * keep).sum() / count)
        elif kind == "mse":
            error = (((s - t) ** 2).sum(-1) * keep).sum() / count
            scale = (((t * t).sum(-1)) * keep).sum() / count
            per_layer.append(error / scale)
        else:
            raise ValueError(kind)
    weights = torch.ones(len(per_layer), dtype=torch.float64)
    if layer_weights is not None:
        weights = torch.tensor(list(layer_weights), dtype=torch.float64)
    return sum(w * loss for w, loss in zip(weights, per_layer, strict=True)) / weights.sum()


# ---------------------------------------------------------------------------------------------
# Fresh random inputs for the tests, and the error measure they use.


def fresh_seed() -> int:
    """A new seed each run (``DISTILL_TEST_SEED`` overrides it), printed so a failure can be replayed."""
    override = os.environ.get("DISTILL_TEST_SEED")
    seed = int(override) if override else random.SystemRandom().randrange(2**63)
    print(f"seed={seed}  (replay with DISTILL_TEST_SEED={seed})")
    return seed


class Rng:
    """Seeded torch and Python generators with the draws the loss tests need."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.torch = torch.Generator().manual_seed(seed)
        self.py = random.Random(seed)

    def choice(self, options: Sequence[T_]) -> T_:
        return self.py.choice(list(options))

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        return (torch.randn(shape, generator=self.torch, dtype=torch.float64) * scale).to(dtype)

    def grid(self, *shape: int, scale: float = 1.0, step: float = 2.0**-6) -> Tensor:
        """Like :meth:`randn`, rounded to multiples of ``step`` (a power of two).

        Head inputs on such a grid make the float32 head matmul exact (small integers times
        ``step**2`` add up without rounding), so a fused loss can be held to the reference as
        tightly as the dense one: what is measured is the loss math, not matmul rounding.
        """
        return (torch.round(self.randn(*shape, scale=scale, dtype=torch.float64) / step) * step).float()

    def head(self, shape: Sequence[int], scale: float, bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(hidden [batch, seq, H], weight [V, H], bias [V] or None)`` on the grid, requiring grad.

        ``shape`` is ``(batch, seq, H, V)``; the logits come out with a standard deviation near ``scale``.
        """
        batch, seq, hidden, vocab = shape
        h = self.grid(batch, seq, hidden).requires_grad_(True)
        w = self.grid(vocab, hidden, scale=scale / math.sqrt(hidden)).requires_grad_(True)
        return h, w, self.grid(vocab, scale=0.5).requires_grad_(True) if bias else None

    def labels(self, leading: Sequence[int], vocab: int, masked: float = 0.3) -> Tensor:
        """Random ids in ``[0, vocab)``, a ``masked`` fraction set to -100 (at least one position kept)."""
        labels = torch.randint(0, vocab, tuple(leading), generator=self.torch)
        drop = torch.rand(tuple(leading), generator=self.torch) < masked
        labels[drop] = -100
        flat = labels.view(-1)
        keep = self.py.randrange(flat.numel())
        flat[keep] = self.py.randrange(vocab)
        return labels

    def topk(
        self, teacher_logits: Tensor, k: int, with_tail: bool, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A teacher's top-k ``(ids, log-probs, tail mass or None)`` in ``dtype``, columns in random order."""
        logprobs = torch.log_softmax(teacher_logits.double(), dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
        order = torch.randperm(k, generator=self.torch)
        values, ids = values[..., order], ids[..., order]
        tail = -torch.expm1(torch.logsumexp(values, dim=-1)) if with_tail else None
        return ids, values.to(dtype), None if tail is None else tail.to(dtype)


def leaves64(*tensors: Tensor | None) -> list[Tensor | None]:
    """Float64 copies of ``tensors`` that require grad (``None`` stays ``None``)."""
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def rel_err(actual: Tensor, reference: Tensor, floor: float = 0.0) -> float:
    """``max |a - b| / max |b|`` (``|a - b| / |b|`` for scalars), with ``max |b|`` floored at ``floor`` (at least
    float64's tiny).

    ``floor`` is the size of the terms a value is computed from when they cancel (``1 - cos`` near 0 is
    computed from terms of size 1): float32 rounds those terms, not the small result.
    """
    actual, reference = actual.detach().double(), reference.detach().double()
    scale = max(float(reference.abs().max()) if reference.numel() else 0.0, floor, torch.finfo(torch.float64).tiny)
    return float((actual - reference).abs().max()) / scale if reference.numel() else 0.0


def assert_close(actual: Tensor, reference: Tensor, tol: float, what: str = "", floor: float = 0.0) -> None:
    """Fail with the relative error (see :func:`rel_err`, ``floor``) when it is ``>= tol``; NaN never passes."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    err = rel_err(actual, reference, floor)
    record_margin(what, err, tol)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def record_margin(what: str, err: float, tol: float) -> None:
    """With ``DISTILL_TEST_MARGINS=<file>``, append ``test<TAB>what<TAB>err/tol`` to it.

    A tolerance is only as good as its margin over many seeds: ``make margins`` runs the float tests at fresh seeds
    and lists the checks whose worst error came closest to their tolerance (a flaky test before it flakes).
    """
    path = os.environ.get("DISTILL_TEST_MARGINS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" (")[0]
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{test}\t{what}\t{err / tol:.4g}\n")

"""Intermediate-layer (hidden-state) distillation loss: the student's residual stream matched to the teacher's.

For each mapped pair of layers the student's hidden states ``[batch, seq, H]`` (already brought to
the teacher's width by a projection, or the teacher's brought to the student's by a channel
selection) are compared token by token with the teacher's, over the tokens a mask keeps:

* ``cosine``: ``1 - cos(s, t)`` per token, in ``[0, 2]``; blind to the states' scale.
* ``mse``: the *relative* squared error ``sum_tokens ||s - t||^2 / sum_tokens ||t||^2``, i.e. per
  token ``||s - t||^2`` divided by the mean over the layer's tokens of ``||t||^2``. 0 is a perfect
  match and 1 is what predicting zeros scores, whatever the width ``H`` and whatever the layer's
  scale (the residual stream's norm grows several-fold with depth), so one weight means the same for
  every layer and every model. A plain MSE would weight deep layers and wide models far more.

The per-layer values are means over the kept tokens; the loss is their (weighted) mean over layers.
An all-masked batch gives 0 (with a zero gradient). Pure torch: nothing here imports transformers.
Math in float32 (float64 inputs stay float64), whatever the models' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.objective import check_finite, upcast

__all__ = ["HIDDEN_LOSSES", "HiddenStateOutput", "hidden_layer_loss", "hidden_state_loss"]

HIDDEN_LOSSES = ("cosine", "mse")

# Cosine: the norms are clamped to this before dividing (a zero vector has cosine 0, not NaN).
_COSINE_EPS = 1e-8


@dataclass
class HiddenStateOutput:
    """What :func:`hidden_state_loss` returns.

    Attributes:
        loss: the weighted mean over layers of the per-layer losses; differentiable scalar.
        layer_losses: ``[layers]`` detached per-layer losses (means over the kept tokens).
        num_tokens: number of tokens the per-layer means are taken over.
    """

    loss: Tensor
    layer_losses: Tensor
    num_tokens: int


def _kept_rows(states: Tensor, rows: Tensor | None) -> Tensor:
    """``[n, H]``: the rows of ``states`` (flattened over its leading dims) that ``rows`` indexes, upcast."""
    flat = states.reshape(-1, states.shape[-1])
    if rows is not None:
        flat = flat.index_select(0, rows)
    return upcast(flat)


def hidden_layer_loss(student: Tensor, teacher: Tensor, rows: Tensor | None, kind: str) -> Tensor:
    """One layer's loss: the mean over the kept tokens of ``kind`` (see the module docstring).

    Args:
        student: ``[..., H]`` student hidden states (at the teacher's width if projected).
        teacher: ``[..., H]`` teacher hidden states, the same shape; never differentiated.
        rows: ``[n]`` int64 indices of the kept tokens in the flattened leading dims, or ``None`` for all.
        kind: ``"cosine"`` or ``"mse"``.

    Returns:
        A scalar in float32 (float64 for float64 inputs); 0 when no token is kept.
    """
    s = _kept_rows(student, rows)
    t = _kept_rows(teacher.detach(), rows).to(s.dtype)
    if s.shape[0] == 0:
        return s.sum() * 0.0  # keeps the graph (a zero gradient) so every process runs the same backward
    if kind == "cosine":
        dot = (s * t).sum(-1)
        norms = s.norm(dim=-1).clamp_min(_COSINE_EPS) * t.norm(dim=-1).clamp_min(_COSINE_EPS)
        return (1.0 - dot / norms).mean()
    if kind == "mse":
        # The scale is the teacher's mean squared norm over these tokens; the tiny floor only guards an
        # all-zero teacher state (then the loss is the student's plain squared norm).
        scale = t.pow(2).sum().clamp_min(torch.finfo(t.dtype).tiny)
        return (s - t).pow(2).sum() / scale
    raise ValueError(f"Unknown hidden-state loss {kind!r}; choose one of {HIDDEN_LOSSES}.")


def hidden_state_loss(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    mask: Tensor | None = None,
    kind: str = "cosine",
    layer_weights: Sequence[float] | None = None,
) -> HiddenStateOutput:
    """The hidden-state distillation loss over several mapped layer pairs.

    Args:
        student_states: per mapped layer, ``[batch, seq, H]`` student hidden states, already at the
            teacher's width (projected) or compared with channel-selected teacher states.
        teacher_states: per mapped layer, ``[batch, seq, H]`` teacher hidden states, same shapes.
        mask: ``[batch, seq]`` bool (or 0/1): the tokens that count; ``None`` for all.
        kind: ``"cosine"`` (``1 - cos`` per token) or ``"mse"`` (relative squared error).
        layer_weights: non-negative weight per layer (default equal); the loss is
            ``sum_l w_l * loss_l / sum_l w_l``.

    Returns:
        :class:`HiddenStateOutput`.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"Unknown hidden-state loss {kind!r}; choose one of {HIDDEN_LOSSES}.")
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(
            f"Give one teacher state per student state (at least one); got {len(student_states)} student and "
            f"{len(teacher_states)} teacher layers."
        )
    weights = [1.0] * len(student_states) if layer_weights is None else [float(w) for w in layer_weights]
    if len(weights) != len(student_states) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"layer_weights must be {len(student_states)} non-negative numbers with a positive sum; got {weights}."
        )
    rows = None
    num_tokens = student_states[0].shape[:-1].numel()
    if mask is not None:
        if mask.shape != student_states[0].shape[:-1]:
            leading = tuple(student_states[0].shape[:-1])
            raise ValueError(f"mask {tuple(mask.shape)} must have the states' leading shape {leading}.")
        rows = mask.reshape(-1).bool().nonzero().squeeze(-1).to(student_states[0].device)  # host-device sync
        num_tokens = int(rows.numel())
    losses = []
    for index, (student, teacher) in enumerate(zip(student_states, teacher_states, strict=True)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"Mapped layer {index}: student states {tuple(student.shape)} and teacher states "
                f"{tuple(teacher.shape)} differ; project the student to the teacher's width (or select the "
                "teacher's channels) first."
            )
        check_finite(student, f"The student's hidden states (mapped layer {index})")
        losses.append(hidden_layer_loss(student, teacher.to(student.device), rows, kind))
    stacked = torch.stack([loss.to(losses[0].device) for loss in losses])
    weight_tensor = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    loss = (stacked * weight_tensor).sum() / weight_tensor.sum()
    return HiddenStateOutput(loss=loss, layer_losses=stacked.detach(), num_tokens=num_tokens)

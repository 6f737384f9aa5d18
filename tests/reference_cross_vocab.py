"""An independent float64 reference for the cross-tokenizer losses (:mod:`distill.losses.cross_vocab`).

Another route than the library: probabilities (not log-probabilities), the class pushforward as a
product with a dense 0/1 matrix, the top-k support deduplicated with Python sets, sorting for ULD
done per row. Nothing here imports :mod:`distill.losses`.
"""

from __future__ import annotations

import math

import torch
from reference import divergence_ref, softmax_ref
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny


def class_matrix(classes: Tensor, num_classes: int) -> Tensor:
    """``[V, C]`` float64 0/1 matrix: row ``v`` has a 1 in column ``classes[v]``."""
    matrix = torch.zeros(classes.numel(), num_classes, dtype=torch.float64)
    matrix[torch.arange(classes.numel()), classes] = 1.0
    return matrix


def _floor_elsewhere(probs: Tensor, elsewhere: int | None) -> Tensor:
    if elsewhere is None:
        return probs
    floored = probs.clone()
    floored[:, elsewhere] = probs[:, elsewhere].clamp_min(TINY)
    return floored


def _sorted_l1(q: Tensor, p: Tensor) -> Tensor:
    width = max(q.shape[-1], p.shape[-1])
    rows = []
    for q_row, p_row in zip(q, p, strict=True):
        q_sorted = torch.cat([q_row.sort(descending=True).values, q_row.new_zeros(width - q_row.numel())])
        p_sorted = torch.cat([p_row.sort(descending=True).values, p_row.new_zeros(width - p_row.numel())])
        rows.append((q_sorted - p_sorted).abs().sum())
    return torch.stack(rows)


def cross_vocab_ref(
    student_logits: Tensor,
    labels: Tensor,
    span_of_row: Tensor,
    teacher_logits: Tensor | None,
    student_classes: Tensor,
    teacher_classes: Tensor,
    num_classes: int,
    kind: str = "pkl",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    matched: tuple[Tensor, Tensor] | None = None,
    sparse: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss, kd_mean_over_spans)``: ``(kd_weight * sum KD + ce_weight * sum CE) / N`` in float64.

    ``teacher_logits`` ``[J, V_t]`` (dense) or ``sparse = (topk_ids [J, k], topk_logprobs [J, k])``.
    """
    logits = student_logits.double()
    q_all = softmax_ref(logits)
    ce = torch.stack([-torch.log(q_all[i, lab]) if lab >= 0 else q_all.new_zeros(()) for i, lab in enumerate(labels)])
    rows = (span_of_row >= 0).nonzero().squeeze(-1)
    spans = span_of_row[rows]
    q = softmax_ref(logits[rows] / temperature)
    elsewhere = num_classes - 1 if num_classes > teacher_classes.numel() else None
    qc = _floor_elsewhere(q @ class_matrix(student_classes, num_classes), elsewhere)
    if sparse is None:
        p = softmax_ref(teacher_logits.double()[spans] / temperature)
        if kind == "uld":
            kd = _sorted_l1(q, p)
        elif kind == "gold":
            student_ids, teacher_ids = matched
            q_m, p_m = q[:, student_ids], p[:, teacher_ids]
            s_rest = [v for v in range(q.shape[-1]) if v not in set(student_ids.tolist())]
            t_rest = [u for u in range(p.shape[-1]) if u not in set(teacher_ids.tolist())]
            # The unmatched mass summed from its own entries: 1 - matched mass is 0 in float64 too once the
            # matched tokens hold all but 1e-16 of it.
            q_b = torch.cat([q_m, q[:, s_rest].sum(-1, keepdim=True).clamp_min(TINY)], -1)
            p_b = torch.cat([p_m, p[:, t_rest].sum(-1, keepdim=True).clamp_min(TINY)], -1)
            weight = teacher_ids.numel() / p.shape[-1]
            kd = weight * divergence_ref(divergence, p_b, q_b, beta) + (1 - weight) * _sorted_l1(
                q[:, s_rest], p[:, t_rest]
            )
        else:
            pc = _floor_elsewhere(p @ class_matrix(teacher_classes, num_classes), elsewhere)
            kd = divergence_ref(divergence, pc, qc, beta)
    else:
        ids, logprobs = sparse[0][spans], sparse[1].double()[spans]
        kd_rows = []
        for r in range(len(rows)):
            support: dict[int, float] = {}
            for u, lp in zip(ids[r].tolist(), logprobs[r], strict=True):
                c = int(teacher_classes[u])
                support[c] = support.get(c, 0.0) + lp.exp()
            classes = list(support)
            p_s = torch.stack([torch.as_tensor(support[c], dtype=torch.float64) for c in classes])
            p_tail = (1 - logprobs[r].exp().sum()).clamp_min(TINY)
            q_s = qc[r, classes]
            q_tail = 1 - q_s.sum()
            if kind == "uld":
                k = ids.shape[-1]
                q_top = q[r].sort(descending=True).values[:k]
                p_top = logprobs[r].exp()
                kd_rows.append(_sorted_l1(q_top[None], p_top[None])[0] + (1 - q_top.sum() - p_tail).abs())
            else:
                kd_rows.append(
                    divergence_ref(divergence, torch.cat([p_s, p_tail[None]]), torch.cat([q_s, q_tail[None]]), beta)
                )
        kd = torch.stack(kd_rows)
    loss = (kd_weight * kd.sum() + ce_weight * ce.sum()) / max(len(labels), 1)
    return loss, kd.sum() / max(len(rows), 1)


__all__ = ["class_matrix", "cross_vocab_ref", "math"]

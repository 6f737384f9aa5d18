"""The tensor plumbing of a training step: next-token labels, generated batches, KD metrics."""

from __future__ import annotations

import torch

from distill.losses import DistillationOutput
from distill.trainer.batching import completion_batch, next_token_labels, positions_from_mask
from distill.trainer.metrics import KDMetrics


def test_next_token_labels_shift_and_mask_document_boundaries() -> None:
    labels = torch.tensor([[-100, 5, 6, 7, 8, 9]])
    assert next_token_labels(labels).tolist() == [[5, 6, 7, 8, 9, -100]]
    # Two packed documents: positions 0-2 and 0-2. The last token of the first must not predict
    # the first token of the second.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert next_token_labels(labels, position_ids).tolist() == [[5, 6, -100, 8, 9, -100]]


def test_positions_skip_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_completion_batch_stops_at_first_eos() -> None:
    pad, eos = 0, 2
    prompts = torch.tensor([[0, 7, 8], [9, 10, 11]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    # Row 0 ends with eos at its 2nd new token, then generate pads; row 1 never ends.
    sequences = torch.cat([prompts, torch.tensor([[20, eos, pad, pad], [21, 22, 23, 24]])], dim=1)
    batch = completion_batch(prompts, prompt_mask, sequences, [eos], pad)
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 20, eos, -100, -100],
        [-100, -100, -100, 21, 22, 23, 24],
    ]
    assert batch["position_ids"][0].tolist()[:5] == [0, 0, 1, 2, 3]
    # Positions after the end are padding in the inputs too (they are masked; their id is the pad).
    assert batch["input_ids"][0, 5:].tolist() == [pad, pad]


def _output(kd: float, ce: float, agree: float, entropy: float, n: int) -> DistillationOutput:
    t = torch.tensor
    return DistillationOutput(t(kd), t(kd), t(ce), t(agree), n, t(entropy))


def test_metrics_are_token_weighted_and_reset() -> None:
    metrics = KDMetrics()
    metrics.add(_output(1.0, 3.0, 0.5, 2.0, n=10), input_tokens=40, generated=False)
    metrics.add(_output(4.0, float("nan"), 1.0, 1.0, n=30), input_tokens=60, generated=True)
    logs = metrics.pop()
    assert abs(logs["kd_loss"] - (10 * 1.0 + 30 * 4.0) / 40) < 1e-9
    assert abs(logs["top1_agreement"] - (5 + 30) / 40) < 1e-9
    assert abs(logs["teacher_entropy"] - (20 + 30) / 40) < 1e-9
    assert logs["on_policy_fraction"] == 0.5 and logs["loss_tokens"] == 40 and logs["tokens_per_second"] > 0
    assert metrics.pop() == {}

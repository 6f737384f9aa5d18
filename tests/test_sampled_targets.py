"""Sampled teacher targets: priority sampling is unbiased, and so is the forward-KL gradient it trains with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.cache import Encoding
from distill.formats.sampling import priority_sample, row_generator
from distill.losses import (
    SparseTargets,
    fused_distillation_loss,
    sparse_distillation_loss,
)


def _teacher(vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """``[vocab]`` float64 log-probs of a peaked random teacher (a long tail, as real LMs have)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * scale, dim=-1)


def _draws(logprobs: torch.Tensor, k: int, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` independent priority samples of one distribution: ``[draws, k]`` ids and log-weights."""
    rows = logprobs.float().expand(draws, -1).contiguous()
    return priority_sample(rows, k, torch.Generator().manual_seed(seed))


def _dense_weights(ids: torch.Tensor, log_weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[draws, vocab]`` float64 weights with zeros at the ids not sampled."""
    return torch.zeros(ids.shape[0], vocab, dtype=torch.float64).scatter(1, ids, log_weights.double().exp())


def test_priority_sample_estimates_every_probability_without_bias() -> None:
    vocab, k, draws = 64, 6, 40_000
    logprobs = _teacher(vocab, seed=1)
    ids, log_weights = _draws(logprobs, k, draws, seed=2)
    weights = _dense_weights(ids, log_weights, vocab)
    p = logprobs.exp()
    mean = weights.mean(0)
    # Each token's mean weight is within 5 standard errors of its probability (the bias is 0). A
    # rare token may never be drawn, so bound the variance, not estimate it: a weight is 0 or
    # max(p, threshold), hence Var <= E[w] * max(w) <= p * max(p, largest threshold).
    largest_threshold = float(log_weights.min(dim=1).values.exp().max())
    standard_error = (p * p.clamp(min=largest_threshold) / draws).sqrt()
    assert bool(((mean - p).abs() <= 5 * standard_error).all())
    # A top-k of the same size is far off: its mean misses the whole tail.
    top = torch.zeros(vocab, dtype=torch.float64).scatter(0, logprobs.topk(k).indices, logprobs.topk(k).values.exp())
    assert float((top - p).abs().sum()) > 20 * float((mean - p).abs().sum())


def test_priority_sample_keeps_k_distinct_tokens_and_heavy_tokens_exactly() -> None:
    vocab, k = 500, 12
    logprobs = torch.stack([_teacher(vocab, seed) for seed in range(50)]).float()
    ids, log_weights = priority_sample(logprobs, k, torch.Generator().manual_seed(0))
    assert ids.shape == (50, k) and log_weights.shape == (50, k)
    assert all(len(set(row.tolist())) == k for row in ids)
    true = logprobs.gather(1, ids)
    assert bool((log_weights >= true - 1e-6).all())  # weight = max(p, threshold)
    threshold = log_weights.min(dim=1, keepdim=True).values
    heavy = true > threshold + 1e-6
    assert bool(heavy.any())
    torch.testing.assert_close(log_weights[heavy], true[heavy], rtol=0, atol=0)
    assert bool((log_weights[:, :-1] >= log_weights[:, 1:]).all())  # highest weight first
    # k >= V keeps everything exactly; zero-mass tokens are never sampled while others remain.
    all_ids, all_weights = priority_sample(logprobs[:2, :10].log_softmax(-1), 10)
    torch.testing.assert_close(all_weights, logprobs[:2, :10].log_softmax(-1).gather(1, all_ids))
    sparse = torch.full((1, 100), -math.inf)
    sparse[0, :5] = math.log(0.2)
    few_ids, few_weights = priority_sample(sparse, 8, torch.Generator().manual_seed(0))
    assert set(few_ids[0, :5].tolist()) == set(range(5))
    torch.testing.assert_close(few_weights[0, :5].exp(), torch.full((5,), 0.2))


def test_row_generator_depends_only_on_the_row_and_seed() -> None:
    first = torch.rand(4, generator=row_generator("abc", 0))
    assert torch.equal(first, torch.rand(4, generator=row_generator("abc", 0)))
    assert not torch.equal(first, torch.rand(4, generator=row_generator("abc", 1)))
    assert not torch.equal(first, torch.rand(4, generator=row_generator("abd", 0)))


@pytest.mark.parametrize("seed", [3, 4])
def test_sampled_forward_kl_gradient_is_unbiased_and_top_k_is_not(seed: int) -> None:
    vocab, k, draws = 80, 8, 20_000
    teacher = _teacher(vocab, seed)
    student = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    # float64 reference: d KL(p || softmax(z)) / dz = softmax(z) - p.
    reference = torch.softmax(student, dim=-1)[0] - teacher.exp()

    ids, log_weights = _draws(teacher, k, draws, seed)
    logits = student.float().expand(draws, -1).clone().requires_grad_(True)
    loss = sparse_distillation_loss(logits, ids, log_weights, None, "forward_kl", sampled=True, reduction="sum")
    (grads,) = torch.autograd.grad(loss.loss, logits)
    mean_grad = grads.double().mean(0)
    # The error of the mean gradient is noise only: its norm is within a few standard errors
    # (summed over the vocabulary, so never-drawn rare tokens do not make the estimate 0).
    standard_error = float(grads.double().var(0).sum().div(draws).sqrt())
    assert float((mean_grad - reference).norm()) <= 4 * standard_error

    top_values, top_ids = teacher.float().topk(k)
    top_logits = student.float().clone().requires_grad_(True)
    top_loss = sparse_distillation_loss(top_logits, top_ids[None], top_values[None], None, "forward_kl")
    (top_grad,) = torch.autograd.grad(top_loss.loss, top_logits)
    assert float((top_grad[0].double() - reference).norm()) > 10 * float((mean_grad - reference).norm())


def test_sampled_targets_dense_sparse_and_fused_forms_agree(rng) -> None:
    """One draw: the sparse loss equals the float64 cross-entropy form, and the fused form equals the sparse one."""
    tokens, hidden, vocab, k = 12, 16, 96, 10
    h = rng.randn(tokens, hidden, dtype=torch.float64)
    weight = rng.randn(vocab, hidden, scale=0.5, dtype=torch.float64)
    teacher = torch.log_softmax(rng.randn(tokens, vocab, scale=3.0, dtype=torch.float64), dim=-1)
    ids, log_weights = priority_sample(teacher, k, torch.Generator().manual_seed(rng.seed))
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(1))
    labels[3] = -100

    h64 = h.clone().requires_grad_(True)
    student_logprobs = torch.log_softmax(h64 @ weight.t(), dim=-1)
    w = log_weights.double().exp()
    # sum_i w_i (log w_i - log q_i): the forward KL of the sampled weights, with no tail.
    per_token = (w * (log_weights.double() - student_logprobs.gather(-1, ids))).sum(-1)
    reference = per_token[labels != -100].mean()
    (reference_grad,) = torch.autograd.grad(reference, h64)

    h32 = h.float().clone().requires_grad_(True)
    sparse = sparse_distillation_loss(h32 @ weight.float().t(), ids, log_weights, labels, "forward_kl", sampled=True)
    (sparse_grad,) = torch.autograd.grad(sparse.loss, h32)
    torch.testing.assert_close(sparse.loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad.double(), reference_grad, rtol=1e-4, atol=1e-6)

    fused_h = h.float().clone().requires_grad_(True)
    targets = SparseTargets(ids, log_weights, None, estimate=True)
    fused = fused_distillation_loss(fused_h, weight.float(), targets, labels, "forward_kl", chunk_size=5)
    (fused_grad,) = torch.autograd.grad(fused.loss, fused_h)
    torch.testing.assert_close(fused.loss, sparse.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, sparse_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl", "tvd", "skew_kl"])
def test_sampled_targets_refuse_divergences_they_would_bias(divergence: str) -> None:
    logits = torch.randn(4, 32)
    ids, log_weights = priority_sample(torch.log_softmax(torch.randn(4, 32), -1), 5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="forward KL"):
        sparse_distillation_loss(logits, ids, log_weights, None, divergence, sampled=True)
    with pytest.raises(ValueError, match="forward KL"):
        sparse_distillation_loss(logits, ids, log_weights, None, "forward_kl", sampled=True, tail="renormalize")
    # beta = 0 makes the JSD the forward KL: allowed.
    sparse_distillation_loss(logits, ids, log_weights, None, "jsd", beta=0.0, sampled=True)


@pytest.mark.parametrize("name", ["compact", "fp16"])
def test_sampled_encoding_round_trip_keeps_weights_above_one(name: str) -> None:
    vocab, k = 49_152, 24
    teacher = torch.log_softmax(torch.randn(300, vocab, generator=torch.Generator().manual_seed(0)) * 4, dim=-1)
    ids, log_weights = priority_sample(teacher, k, torch.Generator().manual_seed(1))
    encoding = Encoding(name, k, vocab, sampled=True)
    assert encoding.describe()["targets"] == "sampled"
    decoded_ids, decoded, tail = encoding.decode(encoding.encode(ids.numpy(), log_weights.numpy(), np.ones(300)))
    np.testing.assert_array_equal(decoded_ids, ids.numpy())
    assert not tail.any()
    weights, decoded_weights = log_weights.double().exp().numpy(), np.exp(decoded.astype(np.float64))
    assert (weights.sum(1) > 1.0).any()  # a draw may sum above 1; nothing clamps it
    # The total is kept to float16 precision; each weight to the grid (compact) or a float16 ulp.
    np.testing.assert_allclose(decoded_weights.sum(1), weights.sum(1), rtol=2e-3)
    np.testing.assert_allclose(decoded_weights, weights, rtol=0.12 if name == "compact" else 2e-3, atol=1e-7)

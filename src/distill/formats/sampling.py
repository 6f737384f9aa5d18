"""Sampled teacher targets: a few tokens per position with weights that estimate the teacher without bias.

Top-k targets are biased: the student is never told how the teacher spreads the mass outside its
top-k (``docs/losses.md``, "Sparse teachers and the missing tail"). Sampling tokens from the teacher
and weighting them so that the expected target equals the teacher's distribution removes that bias
for the forward KL, whose gradient ``q - p`` is linear in ``p`` (the "sparse logit sampling" idea,
Anshumann et al., 2025). We sample with *priority sampling* (Duffield, Lund and Thorup, 2007)
rather than with replacement: it keeps exactly ``k`` distinct tokens, stores the probability of every
token above the threshold exactly, and has near-minimal variance among such schemes.

For each token ``i`` with probability ``p_i`` draw ``u_i ~ U(0, 1)`` and give it priority ``p_i / u_i``;
keep the ``k`` highest priorities; let ``tau`` be the ``(k+1)``-th. A kept token's weight is
``max(p_i, tau)``, any other token's 0. Then ``E[weight_i] = p_i`` for every token: given the others'
priorities, token ``i`` is kept with probability ``min(1, p_i / tau)``, and ``min(1, p_i / tau) *
max(p_i, tau) = p_i``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["priority_sample", "row_generator"]


def priority_sample(logprobs: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Priority-sample ``k`` distinct tokens per position, with unbiased weights.

    Args:
        logprobs: ``[n, V]`` the teacher's log-probabilities (nats, normalised over ``V``).
        k: tokens kept per position.
        generator: random source on ``logprobs``' device (for reproducible targets).

    Returns:
        ``(ids [n, k] int64, log_weights [n, k] float32)``, highest weight first. ``exp(log_weights)``
        estimates ``p`` at those ids without bias (0 elsewhere); its sum is 1 only in expectation.
        With ``k >= V`` every token is kept with its exact probability.
    """
    n, vocab = logprobs.shape
    logprobs = logprobs.float()
    if k >= vocab:
        values, ids = logprobs.sort(dim=-1, descending=True)
        return ids, values
    uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device, dtype=torch.float32)
    # u = 0 would give an infinite priority: clamp to the smallest positive float32 (probability ~1e-38).
    priorities = logprobs - uniform.clamp(min=torch.finfo(torch.float32).tiny).log()
    top_priorities, top_ids = priorities.topk(k + 1, dim=-1)
    log_threshold = top_priorities[:, k : k + 1]
    ids = top_ids[:, :k]
    # A threshold of -inf means fewer than k + 1 tokens have mass: all of them are kept exactly.
    log_weights = torch.maximum(logprobs.gather(-1, ids), log_threshold)
    order = log_weights.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), log_weights.gather(-1, order)


def row_generator(row_key: str, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from a cache row's key and a run seed: a row's samples do not depend on batching."""
    digest = hashlib.blake2b(f"{seed}:{row_key}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

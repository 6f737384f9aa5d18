"""How much a teacher cache costs on disk, and how much of the teacher it keeps: one table per run.

For a real teacher (SmolLM2-135M-Instruct, offline; see ``distill.testing.smollm2_135m_instruct``)
over real text (Python standard-library source and docstrings: code and English), each row is one
cache encoding at one ``k``:

* **bytes/token**: encoded bytes per cached token (``distill.cache.encoding``), before file compression.
* **KL(teacher || cached)**: mean over tokens, in nats, between the teacher's full distribution ``p``
  and the one the cache implies: the decoded top-k probabilities, and the stored tail mass spread
  evenly over the other ``V - k`` tokens (the maximum-entropy completion). 0 means lossless.
* **tail mass**: mean probability the teacher puts outside its top-k.
* **loss error**, **grad error**: for a student distribution (below), the forward-KL training loss
  computed from the cache with ``tail="bucket"`` (what ``CachedTeacher`` trains with) against the
  same loss from the full teacher: relative error of the mean loss, and relative L2 error of the
  gradient with respect to the student's logits over all tokens.

The student's logits are the teacher's scaled by 0.8 plus Gaussian noise (std 1), so it disagrees
with the teacher the way a half-trained student does, reproducibly (seeded).

    PYTHONPATH=src python benchmarks/bench_cache.py --tokens 4096 --out results-cache.md
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill.cache.encoding import Encoding
from distill.losses import distillation_loss, sparse_distillation_loss
from distill.testing import smollm2_135m_instruct


def real_text(max_chars: int) -> str:
    """Python standard-library source files (code, comments and docstrings), in a fixed order."""
    import email
    import json
    import logging
    import textwrap

    parts, total = [], 0
    for module in (textwrap, json.decoder, logging, email.message, argparse, inspect):
        source = inspect.getsource(module)
        parts.append(source)
        total += len(source)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, ids: torch.Tensor, window: int) -> torch.Tensor:
    """``[n, V]`` float32 next-token logits over ``ids`` (1D), in windows of ``window`` tokens."""
    rows = [ids[start : start + window] for start in range(0, ids.numel() - 1, window)]
    chunks = [model(input_ids=row[None]).logits[0, :-1].float() for row in rows if row.numel() > 1]
    return torch.cat(chunks)


def top_k(logprobs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids and log-probs of ``[n, V]`` log-probs, and the tail mass (float64, no cancellation)."""
    values, ids = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, ids, -math.inf)
    tail = torch.logsumexp(rest.double(), dim=-1).exp()
    return ids.numpy(), values.numpy(), tail.numpy()


def implied_kl(logprobs: torch.Tensor, ids: np.ndarray, cached_logprobs: np.ndarray, tail: np.ndarray) -> float:
    """Mean KL(p || q) in nats: q = cached top-k, plus the cached tail spread evenly over the rest."""
    p_log = logprobs.double()
    vocab, k = p_log.shape[-1], ids.shape[-1]
    spread = torch.as_tensor(tail, dtype=torch.float64).clamp(min=1e-300) / (vocab - k)
    q_log = spread.log()[:, None].expand_as(p_log).clone()
    q_log.scatter_(-1, torch.as_tensor(ids), torch.as_tensor(cached_logprobs, dtype=torch.float64))
    p = p_log.exp()
    return float((p * (p_log - q_log)).sum(-1).mean())


def loss_and_grad_errors(
    student: torch.Tensor, teacher: torch.Tensor, ids: np.ndarray, cached_logprobs: np.ndarray, tail: np.ndarray
) -> tuple[float, float]:
    """Relative errors of the cached (bucket) forward-KL loss and its student-logit gradient vs the full teacher's."""
    full_student = student.clone().requires_grad_(True)
    full = distillation_loss(full_student, teacher, None, "forward_kl").loss
    (full_grad,) = torch.autograd.grad(full, full_student)
    cached_student = student.clone().requires_grad_(True)
    cached = sparse_distillation_loss(
        cached_student,
        torch.as_tensor(ids),
        torch.as_tensor(cached_logprobs, dtype=torch.float32),
        None,
        "forward_kl",
        teacher_tail_mass=torch.as_tensor(tail),
        tail="bucket",
    ).loss
    (cached_grad,) = torch.autograd.grad(cached, cached_student)
    loss_error = abs(float(cached) - float(full)) / abs(float(full))
    grad_error = float((cached_grad - full_grad).norm() / full_grad.norm())
    return loss_error, grad_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of real text to score")
    parser.add_argument("--window", type=int, default=512, help="tokens per teacher forward")
    parser.add_argument("--ks", default="8,16,32,64,128")
    parser.add_argument("--encodings", default="compact,fp16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, tokenizer = smollm2_135m_instruct()
    ids = torch.tensor(tokenizer(real_text(args.tokens * 6))["input_ids"][: args.tokens + 1])
    logits = teacher_logits(model, ids, args.window)
    logprobs = torch.log_softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(args.seed)
    student = 0.8 * logits + torch.randn(logits.shape, generator=generator)
    vocab = logits.shape[-1]
    print(f"scored {logits.shape[0]} tokens in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    lines = [
        f"## Teacher cache: bytes vs fidelity (SmolLM2-135M-Instruct, vocab {vocab:,}, {logits.shape[0]:,} tokens "
        "of Python stdlib source)",
        "",
        "| encoding | k | bytes/token | KL(teacher ‖ cached) nats | mean tail mass | loss error | grad error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in (int(value) for value in args.ks.split(",")):
        topk_ids, topk_logprobs, tail = top_k(logprobs, k)
        for name in args.encodings.split(","):
            encoding = Encoding(name, k, vocab)
            decoded_ids, decoded_logprobs, decoded_tail = encoding.decode(
                encoding.encode(topk_ids, topk_logprobs, tail)
            )
            kl = implied_kl(logprobs, decoded_ids, decoded_logprobs, decoded_tail)
            loss_error, grad_error = loss_and_grad_errors(student, logits, decoded_ids, decoded_logprobs, decoded_tail)
            lines.append(
                f"| {name} | {k} | {encoding.bytes_per_token} | {kl:.4f} | {float(tail.mean()):.4f} | "
                f"{loss_error:.2e} | {grad_error:.2e} |"
            )
            print(lines[-1], file=sys.stderr)
    lines += [
        "",
        "bytes/token: encoded, before file compression. KL: teacher's full distribution vs the cache's top-k plus "
        "its tail mass spread evenly over the other tokens. loss / grad error: forward-KL loss with tail='bucket' "
        "from the cache vs from the full teacher, for a student with logits 0.8 x teacher + N(0, 1) noise "
        "(relative error of the mean loss; relative L2 error of the gradient w.r.t. the student's logits).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()

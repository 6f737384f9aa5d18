"""How much a teacher cache costs on disk, how much of the teacher it keeps, and what it saves in training.

For a real teacher (SmolLM2-135M-Instruct, offline; see ``distill.testing.smollm2_135m_instruct``)
over real text (Python standard-library source and docstrings: code and English), each row of the
first table is one kind of cached target at one ``k``:

* **top-k** (``compact`` or ``fp16`` encoding): the ``k`` most likely tokens and the tail mass.
* **sampled** (``compact`` encoding): ``k`` tokens priority-sampled per position with unbiased
  weights (``distill.formats.sampling``); trains the forward KL only.

Columns:

* **bytes/token**: encoded bytes per cached token (``distill.formats.encoding``), before file compression.
* **KL(teacher || cached)**: top-k only; mean over tokens, in nats, between the teacher's full
  distribution ``p`` and the one the cache implies: the decoded top-k probabilities, and the stored
  tail mass spread evenly over the other ``V - k`` tokens (the maximum-entropy completion).
* **logit-grad error**: relative L2 error, over all tokens, of the forward-KL gradient with respect
  to the student's logits (from the cache with ``tail="bucket"``, as ``CachedTeacher`` trains, vs
  from the full teacher). For sampled targets this is one draw: noise, not bias.
* **head-grad error**: the same gradients pushed to a parameter every token shares, the output
  layer (``grad W = H^T grad_logits`` with ``H`` the teacher's last hidden states): how wrong one
  step's update of a real weight matrix is. A sum over tokens averages noise away but keeps bias.
* **mean of D draws**: the head-grad error of the gradient averaged over ``D`` independent draws
  (sampled only; for top-k it equals the head-grad error: deterministic targets have no noise).
* **head-grad bias**: what stays when noise averages out over many steps. Top-k: its error.
  Sampled: the sampling is unbiased (``E[w] = p``, tested), so the bias is the encoding's rounding,
  measured as the mean over the draws of (gradient from the encoded draw - gradient from the same
  draw unencoded): paired, so its noise is small.

The student's logits are the teacher's scaled by 0.8 plus Gaussian noise (std 1), so it disagrees
with the teacher the way a half-trained student does, reproducibly (seeded).

The second table (``--train-rows``, ``--epochs``) trains a real student (the teacher's own
embeddings, head and ``--student-layers`` of its layers, ``distill.models.student_from_teacher``)
for ``--epochs`` epochs with the forward KL against the top-k targets two ways: a live teacher
(``TopKTeacher`` with the same encoding, so the targets are bit-identical) and a cache built once
(``build_cache`` then ``CachedTeacher``), and reports the wall-clock of each and the largest
difference between their logged loss trajectories.

    PYTHONPATH=src python benchmarks/bench_cache.py --tokens 4096 --out results-cache.md
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import add_common_args, markdown_row, markdown_table, time_once, write_report

from distill.formats.encoding import Encoding
from distill.formats.sampling import priority_sample
from distill.losses import distillation_loss, sparse_distillation_loss
from distill.testing import smollm2_135m_instruct


def real_text(max_chars: int, modules: tuple[object, ...] | None = None) -> str:
    """Python standard-library source files (code, comments and docstrings), in a fixed order."""
    import email.message
    import json.decoder
    import logging
    import textwrap

    parts, total = [], 0
    for module in modules or (textwrap, json.decoder, logging, email.message, argparse, inspect):
        source = inspect.getsource(module)
        parts.append(source)
        total += len(source)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, ids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n, V] float32 next-token logits, [n, H] last hidden states)`` over ``ids`` (1D), ``window`` at a time."""
    logits, hidden = [], []
    for start in range(0, ids.numel() - 1, window):
        row = ids[start : start + window]
        if row.numel() < 2:
            continue
        out = model(input_ids=row[None], output_hidden_states=True)
        logits.append(out.logits[0, :-1].float())
        hidden.append(out.hidden_states[-1][0, :-1].float())
    return torch.cat(logits), torch.cat(hidden)


def top_k(logprobs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids and log-probs of ``[n, V]`` log-probs, and the tail mass (float64, no cancellation)."""
    values, ids = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, ids, -math.inf)
    tail = torch.logsumexp(rest.double(), dim=-1).exp()
    return ids.numpy(), values.numpy(), tail.numpy()


def sampled(logprobs: torch.Tensor, k: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Priority-sampled ids and log-weights of ``[n, V]`` log-probs (512 positions at a time), zero tail."""
    pairs = [priority_sample(chunk, k, generator) for chunk in logprobs.split(512)]
    ids = torch.cat([pair[0] for pair in pairs]).numpy()
    return ids, torch.cat([pair[1] for pair in pairs]).numpy(), np.zeros(ids.shape[0])


def implied_kl(logprobs: torch.Tensor, ids: np.ndarray, cached_logprobs: np.ndarray, tail: np.ndarray) -> float:
    """Mean KL(p || q) in nats: q = cached top-k, plus the cached tail spread evenly over the rest."""
    p_log = logprobs.double()
    vocab, k = p_log.shape[-1], ids.shape[-1]
    spread = torch.as_tensor(tail, dtype=torch.float64).clamp(min=1e-300) / (vocab - k)
    q_log = spread.log()[:, None].expand_as(p_log).clone()
    cached = torch.as_tensor(cached_logprobs, dtype=torch.float64)
    # An entry the encoding dropped to zero mass (compact: > 24 nats below the top-1) is part of the tail.
    cached = torch.where(torch.isfinite(cached), cached, spread.log()[:, None].expand_as(cached))
    q_log.scatter_(-1, torch.as_tensor(ids), cached)
    p = p_log.exp()
    return float((p * (p_log - q_log)).sum(-1).mean())


def full_gradient(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` gradient of the mean forward KL(teacher || student) with respect to the student's logits."""
    logits = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_loss(logits, teacher, None, "forward_kl").loss, logits)
    return grad


def cached_gradient(
    student: torch.Tensor, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, is_sampled: bool
) -> torch.Tensor:
    """``[n, V]`` gradient of the forward KL against cached targets (``tail="bucket"``), as the trainer computes it."""
    logits = student.clone().requires_grad_(True)
    loss = sparse_distillation_loss(
        logits, torch.as_tensor(ids), torch.as_tensor(logprobs, dtype=torch.float32), None, "forward_kl",
        teacher_tail_mass=torch.as_tensor(tail, dtype=torch.float32), tail="bucket", sampled=is_sampled,
    ).loss  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def relative_error(estimate: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """``|estimate - exact| / |scale|`` (L2), with ``scale`` defaulting to ``exact``."""
    return float((estimate - exact).norm() / (exact if scale is None else scale).norm())


def fidelity_table(args: argparse.Namespace, model: torch.nn.Module, tokenizer: object) -> list[str]:
    """The bytes-vs-fidelity table's markdown lines."""
    started = time.perf_counter()
    ids = torch.tensor(tokenizer(real_text(args.tokens * 6))["input_ids"][: args.tokens + 1])
    logits, hidden = teacher_outputs(model, ids, args.window)
    logprobs = torch.log_softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(args.seed)
    student = 0.8 * logits + torch.randn(logits.shape, generator=generator)
    vocab = logits.shape[-1]
    exact = full_gradient(student, logits)
    exact_head = hidden.t() @ exact
    print(f"scored {logits.shape[0]} tokens in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    lines = [
        f"## Teacher cache: bytes vs fidelity (SmolLM2-135M-Instruct, vocab {vocab:,}, {logits.shape[0]:,} tokens "
        "of Python stdlib source)",
        "",
        *markdown_table(["targets", "encoding", "k", "bytes/token", "KL(teacher ‖ cached) nats", "logit-grad error",
                         "head-grad error", f"head-grad error, mean of {args.draws} draws", "head-grad bias"],
                        [], align="llrrrrrrr"),
    ]  # fmt: skip
    rows = [("top-k", name, k) for k in args.ks for name in args.encodings]
    rows += [("sampled", "compact", k) for k in args.sampled_ks]
    for kind, name, k in rows:
        is_sampled = kind == "sampled"
        encoding = Encoding(name, k, vocab, sampled=is_sampled)
        kl_text, grad_sum, quantization_sum = "–", torch.zeros_like(exact), torch.zeros_like(exact)
        draws = args.draws if is_sampled else 1
        for draw in range(draws):
            raw = sampled(logprobs, k, generator) if is_sampled else top_k(logprobs, k)
            decoded = encoding.decode(encoding.encode(*raw))
            if not is_sampled:
                kl_text = f"{implied_kl(logprobs, *decoded):.4f}"
            grad = cached_gradient(student, *decoded, is_sampled)
            grad_sum += grad
            if is_sampled:
                # Paired with the same draw's unencoded weights: isolates the encoding's bias, with little noise.
                quantization_sum += grad - cached_gradient(student, *raw, True)
            if draw == 0:
                logit_error = relative_error(grad, exact)
                head_error = relative_error(hidden.t() @ grad, exact_head)
        mean_error = relative_error(hidden.t() @ (grad_sum / draws), exact_head)
        # Top-k targets are deterministic: their bias is their error. Sampled weights are unbiased
        # (E[w] = p, tested in tests/test_sampled_targets.py); what the encoding adds is measured paired.
        bias = (
            float((hidden.t() @ (quantization_sum / draws)).norm() / exact_head.norm()) if is_sampled else head_error
        )
        errors = [f"{logit_error:.2e}", f"{head_error:.2e}", f"{mean_error:.2e}", f"{bias:.2e}"]
        lines.append(markdown_row([kind, name, k, encoding.bytes_per_token, kl_text, *errors]))
        print(lines[-1], file=sys.stderr)
    lines += [
        "",
        "bytes/token: encoded, before file compression. KL: the teacher's full distribution vs the cache's top-k "
        "plus its tail mass spread evenly over the other tokens. Errors: relative L2 error of the forward-KL "
        "gradient from the cache (tail='bucket') vs from the full teacher, for a student with logits 0.8 x teacher "
        "+ N(0, 1): w.r.t. the student's logits (logit), and pushed to the output layer through the teacher's last "
        f"hidden states (head). Sampled rows: one draw, and the gradient averaged over {args.draws} draws (noise "
        "falls as 1/sqrt(draws)); bias: top-k, its error (deterministic); sampled, the encoding's bias measured "
        "paired against the same draws unencoded (the sampling itself is unbiased).",
    ]
    return lines


def training_table(args: argparse.Namespace, model: torch.nn.Module, tokenizer: object) -> list[str]:
    """Wall-clock of training from a live top-k teacher vs from a cache built once, same targets."""
    import email.feedparser
    import http.client
    import tarfile
    import zipfile

    import datasets

    from distill import DistillConfig, Trainer
    from distill.cache import build_cache
    from distill.models import student_from_teacher
    from distill.teachers import CachedTeacher, TopKTeacher

    text = real_text(args.train_rows * args.max_length * 8, (zipfile, tarfile, http.client, email.feedparser))
    token_ids = tokenizer(text)["input_ids"]
    span = args.max_length
    rows = [{"text": tokenizer.decode(token_ids[i * span : (i + 1) * span])} for i in range(args.train_rows)]
    dataset = datasets.Dataset.from_list(rows)
    k = args.train_k
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))

    def train(teacher: object, name: str) -> tuple[float, list[float]]:
        config = DistillConfig(
            output_dir=str(work / name), per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
            learning_rate=5e-5, lr_scheduler_type="constant", loss="forward_kl", max_length=args.max_length + 8,
            use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
        )  # fmt: skip
        trainer = Trainer(
            model=student_from_teacher(model, args.student_layers), teacher=teacher, args=config,
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
        seconds = time_once(trainer.train)
        return seconds, [e["loss"] for e in trainer.state.log_history if "loss" in e]

    live_s, live_losses = train(TopKTeacher(model, k, encoding="compact"), "live")
    started = time.perf_counter()
    manifest = build_cache(
        model, dataset, work / "cache", tokenizer=tokenizer, top_k=k, max_length=args.max_length + 8, progress=False
    )
    build_s = time.perf_counter() - started  # the manifest is the result, so not through time_once
    cached_s, cached_losses = train(CachedTeacher(work / "cache", tokenizer=tokenizer), "cached")
    steps = len(live_losses)
    tokens = manifest["totals"]["tokens"]
    difference = max(abs(a - b) for a, b in zip(live_losses, cached_losses, strict=True))
    epochs = args.epochs
    return [
        "",
        f"## Training {epochs} epochs: live teacher vs cache (student: {args.student_layers} of the teacher's 30 "
        f"layers, {args.train_rows} rows x {args.max_length} tokens, batch {args.batch}, {steps} steps, forward KL "
        f"on top-{k} compact targets, CPU)",
        "",
        *markdown_table(
            ["teacher", "cache build s", "training s", "s/epoch", "total s"],
            [
                ["live `TopKTeacher`", "–", f"{live_s:.1f}", f"{live_s / epochs:.1f}", f"{live_s:.1f}"],
                [
                    "`CachedTeacher`",
                    f"{build_s:.1f}",
                    f"{cached_s:.1f}",
                    f"{cached_s / epochs:.1f}",
                    f"{build_s + cached_s:.1f}",
                ],
            ],
        ),  # fmt: skip
        "",
        f"Cache: {tokens:,} tokens, {manifest['totals']['file_bytes']:,} bytes on disk "
        f"({manifest['totals']['file_bytes_per_token']} B/token, zstd). Loss trajectories over {steps} steps: "
        f"largest |live - cached| = {difference:.2e} (first {live_losses[0]:.4f}, last live {live_losses[-1]:.4f}, "
        f"last cached {cached_losses[-1]:.4f}).",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of real text to score")
    parser.add_argument("--window", type=int, default=512, help="tokens per teacher forward")
    parser.add_argument("--ks", type=lambda v: [int(x) for x in v.split(",")], default=[8, 16, 32, 64, 128])
    parser.add_argument("--encodings", type=lambda v: v.split(","), default=["compact", "fp16"])
    parser.add_argument("--sampled-ks", type=lambda v: [int(x) for x in v.split(",") if x], default=[16, 24, 32])
    parser.add_argument("--draws", type=int, default=8, help="independent draws for the sampled rows' bias")
    add_common_args(parser, "seed")
    parser.add_argument("--train-rows", type=int, default=32, help="rows of the training comparison (0: skip it)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training row")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--train-k", type=int, default=32)
    add_common_args(parser, "out")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = smollm2_135m_instruct()
    lines = fidelity_table(args, model, tokenizer) if args.tokens else []
    if args.train_rows:
        lines += training_table(args, model, tokenizer)
    write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

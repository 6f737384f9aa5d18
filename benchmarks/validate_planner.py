#!/usr/bin/env python
"""Check ``distill.planning``'s memory model against measured peak memory of real ``distill.Trainer`` runs on a CPU.

Each case builds a random-weight Llama student and a 2-3x larger teacher from configs (vocabulary
32,768), trains a few optimizer steps with ``distill.Trainer`` in fp32 on full-length rows, and
measures the process's peak resident set size (``VmHWM``) above a baseline taken after the data
exists and before the models are built, so weights, optimizer states, activations and loss buffers
are all in the measurement. Each case runs in its own subprocess (this script with ``--case NAME``),
so one case's freed memory cannot hide another's. The planner is asked for the same run with
``gpu="cpu"`` (fp32, no CUDA context) and its predicted peak is compared with the measurement.

Examples::

    PYTHONPATH=src python benchmarks/validate_planner.py
    PYTHONPATH=src python benchmarks/validate_planner.py --cases small,small-dense --out results.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from harness import GIB, add_common_args, child_env, emit, markdown_table, run_in_child, write_report

RESULT_PREFIX = "VALIDATE_RESULT "
VOCAB = 32768


@dataclass(frozen=True)
class Shape:
    """A random-weight Llama: layers x hidden, MLP width, query / key-value heads."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    def config(self) -> dict[str, Any]:
        """The ``config.json`` keys the planner reads (and ``LlamaConfig`` takes)."""
        return {
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": VOCAB,
            "tie_word_embeddings": False,
        }


@dataclass(frozen=True)
class Case:
    """One training run to measure."""

    student: Shape
    teacher: Shape
    seq_len: int
    batch: int
    gradient_checkpointing: bool = False
    loss_impl: str = "fused"
    lora_rank: int | None = None
    steps: int = 3


SMALL_STUDENT, SMALL_TEACHER = Shape(4, 256, 688, 4, 2), Shape(4, 512, 1376, 8, 4)
MEDIUM_STUDENT, MEDIUM_TEACHER = Shape(8, 512, 1376, 8, 4), Shape(8, 768, 2048, 12, 4)
CASES: dict[str, Case] = {
    "small": Case(SMALL_STUDENT, SMALL_TEACHER, seq_len=256, batch=4),
    "small-dense": Case(SMALL_STUDENT, SMALL_TEACHER, seq_len=256, batch=4, loss_impl="dense"),
    "medium": Case(MEDIUM_STUDENT, MEDIUM_TEACHER, seq_len=512, batch=2),
    "medium-ckpt": Case(MEDIUM_STUDENT, MEDIUM_TEACHER, seq_len=512, batch=2, gradient_checkpointing=True),
    "medium-lora": Case(MEDIUM_STUDENT, MEDIUM_TEACHER, seq_len=512, batch=2, lora_rank=16),
}


@dataclass
class Measured:
    """What a child reports: peak RSS growth and the student/teacher sizes."""

    case: str
    peak_gib: float
    after_models_gib: float
    student_params: int
    teacher_params: int
    seconds: float


def run_child(name: str, threads: int) -> Measured:
    """Build the case's models and data, train, and measure peak RSS above the pre-model baseline."""
    import gc

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distill import DistillConfig, Trainer
    from distill.evaluation.memory import status_bytes
    from distill.testing import train_tiny_tokenizer

    torch.set_num_threads(threads)
    case = CASES[name]
    tokenizer = train_tiny_tokenizer()
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(4, len(tokenizer), (case.seq_len,), generator=generator).tolist()}
        for _ in range(case.batch * case.steps)
    ]
    dataset = Dataset.from_list(rows)
    peft_config = None
    if case.lora_rank is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank, target_modules="all-linear")

    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS to the current RSS
    baseline = status_bytes("VmRSS")

    def build(shape: Shape, seed: int) -> Any:
        torch.manual_seed(seed)
        config = LlamaConfig(**shape.config(), max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    teacher, student = build(case.teacher, 0), build(case.student, 1)
    after_models = status_bytes("VmRSS") - baseline
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="validate_planner_") as output_dir:
        args = DistillConfig(
            output_dir=output_dir,
            per_device_train_batch_size=case.batch,
            gradient_accumulation_steps=1,
            max_steps=case.steps,
            learning_rate=1e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            max_length=case.seq_len,
            completion_only_loss=False,
            gradient_checkpointing=case.gradient_checkpointing,
            loss_implementation=case.loss_impl,
            vocab_size=VOCAB,  # the whole head, not just the 512 ids the test tokenizer has
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=student,
            teacher=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trainer.train()
    return Measured(
        case=name,
        peak_gib=(status_bytes("VmHWM") - baseline) / GIB,
        after_models_gib=after_models / GIB,
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        seconds=time.perf_counter() - start,
    )


def predict(case: Case) -> Any:
    """The planner's plan for the same run on the CPU (fp32 everywhere, no CUDA context)."""
    from distill.planning import plan_run

    return plan_run(
        case.student.config(),
        case.teacher.config(),
        gpu="cpu",
        max_length=case.seq_len,
        per_device_train_batch_size=case.batch,
        lora_rank=case.lora_rank,
        teacher_mode="fp32",
        precision="fp32",
        gradient_checkpointing=case.gradient_checkpointing,
        loss_implementation=case.loss_impl,
        # The rows are all seq_len tokens long: nothing is padded, so no attention mask is built.
        padded=False,
        suggest=False,
    )


def run_case(name: str, threads: int, return_freed: bool) -> Measured | str:
    """Run one case in a fresh process; its result, or an error line.

    With ``return_freed``, glibc serves every allocation of 64 KiB or more with its own mmap
    (``MALLOC_MMAP_THRESHOLD_=65536``), so a freed tensor's pages go back to the OS at once and peak RSS
    is close to the peak of live tensors, which is what the planner models (and what CUDA's
    ``max_memory_allocated`` reports). Without it glibc keeps freed heap memory for reuse, and peak RSS
    also holds memory no tensor uses any more.
    """
    command = [sys.executable, __file__, "--case", name, "--threads", str(threads)]
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    if not return_freed:
        env.pop("MALLOC_MMAP_THRESHOLD_")
    result, proc = run_in_child(command, RESULT_PREFIX, env=env)
    return Measured(**result) if result is not None else f"failed (exit code {proc.returncode}; see stderr)"


def describe(case: Case) -> str:
    """``s 4x256 / t 4x512, 4x256 tok, fused`` style summary of a case."""
    parts = [
        f"student {case.student.layers}x{case.student.hidden}",
        f"teacher {case.teacher.layers}x{case.teacher.hidden}",
        f"batch {case.batch} x {case.seq_len}",
        f"{case.loss_impl} loss",
    ]
    if case.gradient_checkpointing:
        parts.append("checkpointing")
    parts.append(f"LoRA r={case.lora_rank}" if case.lora_rank else "full fine-tune")
    return ", ".join(parts)


Row = tuple[str, Case, Any, Measured | str, Measured | str]


def _cells(predicted: float, measured: Measured | str) -> list[str]:
    if isinstance(measured, str):
        return [measured, "—"]
    return [f"{measured.peak_gib:.3f}", f"{100 * (predicted - measured.peak_gib) / measured.peak_gib:+.0f}%"]


def table(rows: list[Row]) -> list[str]:
    """The markdown table: case, its setup, predicted GiB, and measured GiB with the error for both allocators."""
    header = ["case", "setup", "student / teacher params", "predicted GiB", "measured GiB (freed memory returned)",
              "error", "measured GiB (glibc default)", "error"]  # fmt: skip
    cells = []
    for name, case, plan, returned, default in rows:
        predicted = plan.memory.total_bytes / GIB
        known = returned if not isinstance(returned, str) else default
        params = (
            "—" if isinstance(known, str) else f"{known.student_params / 1e6:.1f}M / {known.teacher_params / 1e6:.1f}M"
        )
        measured = [*_cells(predicted, returned), *_cells(predicted, default)]
        cells.append([name, describe(case), params, f"{predicted:.3f}", *measured])
    return markdown_table(header, cells, align="llrrrrrr")


def breakdown(plan: Any) -> str:
    """The planner's items for one case, as ``name GiB`` pairs (items not at the peak in brackets)."""
    return "; ".join(
        f"{item.name} {item.gib:.3f}" if item.at_peak else f"({item.name} {item.gib:.3f})"
        for item in plan.memory.items
    )


def main(argv: list[str] | None = None) -> None:
    """Parent (every case, the table) or child (``--case``) entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=",".join(CASES))
    add_common_args(parser, "threads", "out", threads=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.case:
        emit(asdict(run_child(args.case, args.threads)), RESULT_PREFIX)
        return
    rows = []
    for name in args.cases:
        case = CASES[name]
        print(f"[{name}] {describe(case)} ...", file=sys.stderr, flush=True)
        returned = run_case(name, args.threads, return_freed=True)
        default = run_case(name, args.threads, return_freed=False)
        rows.append((name, case, predict(case), returned, default))
    lines = [*table(rows), "", "Planner items per case (GiB; items alive at another moment of the step in brackets):"]
    lines += [f"- {name}: {breakdown(plan)}" for name, _, plan, _, _ in rows]
    write_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

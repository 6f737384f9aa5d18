#!/usr/bin/env python
"""The one GPU check: everything that only a GPU can tell, in one run of <= 8 minutes on one H100 / H200.

Parts (each timed, each recorded even when it fails or is skipped):

1. ``pytest -m gpu`` (tests/test_gpu.py): bf16 end to end, fused == dense on CUDA, a 4-bit teacher through
   bitsandbytes, an FSDP2-sharded student on one GPU.
2. The fused loss against Liger's ``LigerFusedLinearJSDLoss`` (compiled) at Liger's published setting:
   BT = 8192 tokens, H = 4096, V = 128,256, bf16, forward + backward (Liger reports 11.1 GB / 60.7 ms on
   an H100).
3. Trainer tokens/s and MFU for random-weight models built from their configs: a Qwen2.5-0.5B student
   with a Qwen2.5-1.5B teacher (full fine-tune, bf16 autocast), the same pair with the dense loss (full
   ``[tokens x V]`` logits: the planner's other loss model), and a Qwen2.5-7B LoRA student with a
   Qwen2.5-14B 4-bit teacher (needs bitsandbytes).
4. The planner's predicted peak memory against ``torch.cuda.max_memory_allocated`` for the 3 trainer runs
   (``planner_gb`` less its fixed CUDA-context item, which the allocator does not count).

``--dry`` runs the same code at tiny sizes on a CPU (the test suite runs it, so this script cannot rot).
Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` and prints the table.

Examples::

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check/        # on the GPU machine
    PYTHONPATH=src python benchmarks/gpu_check.py --dry --out /tmp/check  # anywhere
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import StepClock, markdown_table, time_repeats, write_json

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, no sparsity
LIGER_PUBLISHED = "11.1 GB / 60.7 ms (H100, Liger's README)"

# Qwen2.5 shapes (config.json of each model): hidden, layers, heads, kv heads, intermediate, vocab, tied.
QWEN = {
    "0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "7B": (3584, 28, 28, 4, 18944, 152064, False),
    "14B": (5120, 48, 40, 8, 13824, 152064, False),
}
TINY = (64, 2, 4, 2, 128, 512, True)
TINY_TEACHER = (96, 3, 4, 2, 192, 512, True)

FULL = {"loss": (8192, 4096, 128256), "seq": 1024, "batch": 4, "steps": 6, "gpu_tests": True}
# name -> (student, teacher, LoRA student, 4-bit teacher, loss_implementation)
TRAINER_RUNS: dict[str, tuple[str, str, bool, bool, str]] = {
    "0.5B<-1.5B": ("0.5B", "1.5B", False, False, "fused"),
    "0.5B<-1.5B dense loss": ("0.5B", "1.5B", False, False, "dense"),
    "7B LoRA<-14B 4-bit": ("7B", "14B", True, True, "fused"),
}
DRY = {"loss": (64, 32, 257), "seq": 32, "batch": 2, "steps": 3, "gpu_tests": True}


def qwen_config(shape: tuple[int, int, int, int, int, int, bool], vocab: int | None = None) -> Any:
    from transformers import Qwen2Config

    hidden, layers, heads, kv_heads, intermediate, vocab_size, tied = shape
    return Qwen2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, vocab_size=vocab or vocab_size, tie_word_embeddings=tied,
        max_position_embeddings=4096,
    )  # fmt: skip


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def gpu_tests(dry: bool, device: torch.device) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py``: counts of passed / failed / skipped (all skip without CUDA)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:xdist",
        "-q",
        "-m",
        "gpu",
        str(ROOT / "tests" / "test_gpu.py"),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    counts = {word: 0 for word in ("passed", "failed", "skipped", "error")}
    for part in summary.replace("=", "").split(","):
        bits = part.split()
        if len(bits) >= 2 and bits[0].isdigit() and bits[1].rstrip("s") in counts:
            counts[bits[1].rstrip("s")] = int(bits[0])
    status = "ok" if result.returncode in (0, 5) and not counts["failed"] and not counts["error"] else "failed"
    return {"status": status, "summary": summary, **counts, "tail": result.stdout[-1500:] if status != "ok" else ""}


def _time_loss(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Mean ms of ``repeats`` steps after one warm-up (and compilation), and the peak GB of the timed ones."""
    timing = time_repeats(step, repeats, warmup=1, device=device, before_timing=lambda: _reset_peak(device))
    return timing.mean * 1e3, _peak_gb(device)


def fused_vs_liger(dry: bool, device: torch.device) -> dict[str, Any]:
    """Forward + backward of generalized JSD (beta 0.5) over BT tokens: distill's fused loss and Liger's."""
    from distill.losses import TeacherHead, fused_distillation_loss

    tokens, hidden_size, vocab = (DRY if dry else FULL)["loss"]
    dtype = torch.float32 if dry else torch.bfloat16
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(*shape: int, grad: bool = False) -> torch.Tensor:
        value = (torch.randn(*shape, generator=generator) * 0.02).to(device, dtype)
        return value.requires_grad_(grad)

    student_hidden, student_weight = tensor(tokens, hidden_size, grad=True), tensor(vocab, hidden_size, grad=True)
    teacher_hidden, teacher_weight = tensor(tokens, hidden_size), tensor(vocab, hidden_size)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    inputs_gb = sum(t.numel() * t.element_size() for t in (student_hidden, student_weight, teacher_hidden,
                                                           teacher_weight)) / GB  # fmt: skip

    def ours() -> None:
        student_hidden.grad = student_weight.grad = None
        targets = TeacherHead(teacher_hidden, teacher_weight, None)
        fused_distillation_loss(student_hidden, student_weight, targets, labels, "jsd", beta=0.5).loss.backward()

    repeats = 2 if dry else 5
    ms, peak = _time_loss(ours, device, repeats)
    row: dict[str, Any] = {"status": "ok", "tokens": tokens, "hidden": hidden_size, "vocab": vocab,
                           "dtype": str(dtype), "distill_ms": round(ms, 2), "distill_peak_gb": peak,
                           "inputs_gb": round(inputs_gb, 3), "liger_published": LIGER_PUBLISHED}  # fmt: skip
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        row["liger"] = "not installed (pip install liger-kernel)"
        return row
    liger = LigerFusedLinearJSDLoss(beta=0.5, temperature=1.0, compiled=not dry)

    def theirs() -> None:
        student_hidden.grad = student_weight.grad = None
        liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels).backward()

    ms, peak = _time_loss(theirs, device, repeats)
    row.update(liger_ms=round(ms, 2), liger_peak_gb=peak)
    return row


def _random_rows(count: int, length: int, vocab: int) -> Any:
    from datasets import Dataset

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (count, length), generator=generator).tolist()
    # Pre-tokenized rows: the second half of each row carries loss.
    return Dataset.from_list(
        [{"input_ids": row, "labels": [-100] * (length // 2) + row[length // 2 :]} for row in ids]
    )


def trainer_run(name: str, dry: bool, device: torch.device, gpu_name: str) -> dict[str, Any]:
    """Train a few steps of one student / teacher pair; tokens/s, MFU, peak memory and the planner's prediction."""
    from transformers import AutoModelForCausalLM

    from distill import DistillConfig, Trainer
    from distill.planning import plan_run

    size = DRY if dry else FULL
    student_size, teacher_size, lora, teacher_4bit, loss_implementation = TRAINER_RUNS[name]
    if teacher_4bit and device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"status": "skipped", "reason": "bitsandbytes not installed"}
    student_config = qwen_config(TINY if dry else QWEN[student_size])
    teacher_config = qwen_config(TINY_TEACHER if dry else QWEN[teacher_size], vocab=student_config.vocab_size)
    dtype = torch.float32 if dry else torch.bfloat16
    _reset_peak(device)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32 if not lora else dtype)
    teacher = AutoModelForCausalLM.from_config(teacher_config, dtype=dtype)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if teacher_4bit and device.type == "cuda":
        from distill.models import load_causal_lm

        with tempfile.TemporaryDirectory() as folder:  # quantize on load, as a user's teacher would be
            teacher.save_pretrained(folder)
            del teacher
            teacher = load_causal_lm(folder, dtype=dtype, quantization="4bit", device=device)
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as out:
        args = DistillConfig(
            output_dir=out, per_device_train_batch_size=size["batch"], max_steps=size["steps"], max_length=size["seq"],
            learning_rate=1e-5, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
            bf16=not dry, use_cpu=device.type == "cpu", loss="jsd", beta=0.5, dataloader_num_workers=0,
            loss_implementation=loss_implementation,
        )  # fmt: skip
        rows = _random_rows(size["batch"] * size["steps"], size["seq"], student_config.vocab_size)
        from distill.testing import train_tiny_tokenizer

        tokenizer = train_tiny_tokenizer()  # only its pad id and template are used: the rows are pre-tokenized
        trainer = Trainer(model=student, teacher=teacher, args=args, train_dataset=rows, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[clock.callback])  # fmt: skip
        trainer.train()
    steady = clock.times[1:] or clock.times
    seconds = sorted(steady)[len(steady) // 2]
    tokens = size["batch"] * size["seq"]
    student_params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in trainer.teacher.model.parameters())
    # Training FLOPs: 6 per student parameter per token (LoRA: 4, no weight gradients of the base), 2 per teacher one.
    flops = ((4 if lora else 6) * student_params + 2 * teacher_params) * tokens
    peak_flops = next((value for key, value in PEAK_BF16_FLOPS.items() if key in gpu_name), None)
    measured = _peak_gb(device)
    planned = plan_run(
        student_config.to_dict(), teacher_config.to_dict(), gpu="H100" if device.type == "cuda" else "cpu",
        max_length=size["seq"], per_device_train_batch_size=size["batch"], lora_rank=16 if lora else None,
        teacher_mode="4bit" if teacher_4bit and device.type == "cuda" else ("fp32" if dry else "bf16"),
        precision="fp32" if dry else "mixed", loss_implementation=loss_implementation, suggest=False,
    )  # fmt: skip
    # max_memory_allocated counts tensors only: compare without the planner's CUDA context + allocator reserve.
    context = planned.memory.get("CUDA context + allocator reserve")
    predicted = (planned.memory.total_bytes - context) / GB
    return {
        "status": "ok", "student_params": student_params, "teacher_params": teacher_params, "tokens_per_step": tokens,
        "step_seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 1),
        "mfu": round(flops / seconds / peak_flops, 4) if peak_flops and device.type == "cuda" else None,
        "loss": loss_implementation, "peak_gb": None if measured is None else round(measured, 2),
        "planner_gb": round(predicted, 4), "planner_peak_phase": planned.memory.peak_phase,
        "planner_error": None if measured is None else round(predicted / measured - 1, 3),
    }  # fmt: skip


def _run(name: str, part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = part()
    except Exception as error:  # one broken part must not hide the others' figures
        result = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc()[-2000:],
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {result['status']} in {result['seconds']} s", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one table per part."""
    rows = []
    for name, result in report["parts"].items():
        figures = ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("status", "trace", "tail"))
        rows.append([name, result["status"], figures])
    lines = [f"# GPU check ({report['device']}{', dry run' if report['dry'] else ''})", "",
             f"torch {report['torch']}, {report['seconds']} s in all.", "",
             *markdown_table(["part", "status", "figures"], rows, align="lll")]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--skip-pytest", action="store_true", help="leave out part 1 (pytest -m gpu)")
    cli = parser.parse_args(argv)
    if not cli.dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry for the CPU dry run")
    device = torch.device("cuda" if not cli.dry else "cpu")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    start = time.perf_counter()
    parts: dict[str, dict[str, Any]] = {}
    if not cli.skip_pytest:
        parts["pytest -m gpu"] = _run("pytest -m gpu", lambda: gpu_tests(cli.dry, device))
    parts["fused loss vs Liger"] = _run("fused loss vs Liger", lambda: fused_vs_liger(cli.dry, device))
    for name in TRAINER_RUNS:
        parts[f"trainer {name}"] = _run(
            f"trainer {name}", lambda name=name: trainer_run(name, cli.dry, device, gpu_name)
        )
    report = {"device": gpu_name, "dry": cli.dry, "torch": torch.__version__,
              "seconds": round(time.perf_counter() - start, 1), "parts": parts}  # fmt: skip
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "gpu_check.json")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    return 0 if all(part["status"] in ("ok", "skipped") for part in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

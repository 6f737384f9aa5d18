#!/usr/bin/env python
"""End-to-end distillation training: ``distill.Trainer`` against TRL's ``GKDTrainer`` and ``DistillationTrainer``.

The same random-weight student/teacher pair (built from configs, seeded), the same chat data, the same
loss (generalized JSD, beta 0.5, temperature 1) and the same training arguments for every case; one
training run per case, each in its own subprocess (this script with ``--case NAME``) so its peak memory
is measured on a clean process. Prints a markdown table: tokens/s, peak memory, final loss. See
``benchmarks/README.md``.

Examples::

    PYTHONPATH=src python benchmarks/bench_trainer.py --preset tiny
    PYTHONPATH=src python benchmarks/bench_trainer.py --preset cpu --out results-trainer.md
    PYTHONPATH=src python benchmarks/bench_trainer.py --preset gpu --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    GIB,
    add_common_args,
    child_env,
    cpu_model,
    emit,
    failure,
    log,
    markdown_table,
    package_versions,
    run_in_child,
    write_report,
)

LAST_LOGGED = 3  # final loss = mean of the loss over this many last logged steps


@dataclass(frozen=True)
class ModelSpec:
    """Shape of one random-weight causal LM."""

    family: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool = False


@dataclass(frozen=True)
class Preset:
    """Models, data and training sizes of one benchmark run."""

    vocab: int
    teacher: ModelSpec
    student: ModelSpec
    batch: int
    max_length: int
    row_tokens: tuple[int, int]  # each chat row (template included) has between these many tokens
    steps: int
    max_new_tokens: int
    dtype: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        vocab=2048,
        teacher=ModelSpec("llama", 64, 2, 4, 2, 128),
        student=ModelSpec("llama", 32, 2, 4, 2, 64),
        batch=2,
        max_length=192,
        row_tokens=(100, 160),
        steps=3,
        max_new_tokens=8,
        dtype="fp32",
    ),
    "cpu": Preset(
        vocab=32768,
        teacher=ModelSpec("llama", 512, 4, 8, 4, 1376),
        student=ModelSpec("llama", 256, 4, 4, 2, 688),
        batch=4,
        max_length=256,
        row_tokens=(150, 250),
        steps=20,
        max_new_tokens=32,
        dtype="fp32",
    ),
    # Qwen2.5-1.5B teacher and Qwen2.5-0.5B student shapes (random weights), Qwen2.5 vocabulary.
    "gpu": Preset(
        vocab=151936,
        teacher=ModelSpec("qwen2", 1536, 28, 12, 2, 8960, tie_embeddings=True),
        student=ModelSpec("qwen2", 896, 24, 14, 2, 4864, tie_embeddings=True),
        batch=4,
        max_length=1024,
        row_tokens=(500, 1000),
        steps=30,
        max_new_tokens=32,
        dtype="bf16",
    ),
}


@dataclass(frozen=True)
class Case:
    """One row: which trainer, on- or off-policy, and (if any) why it cannot run."""

    label: str
    trainer: str  # "distill", "distill-dense", "gkd", "trl-distillation"
    on_policy: bool
    not_applicable: str = ""


CASES: dict[str, Case] = {
    "distill": Case("distill Trainer (fused loss)", "distill", False),
    "distill-dense": Case("distill Trainer (dense loss)", "distill-dense", False),
    "gkd": Case("TRL GKDTrainer", "gkd", False),
    "trl-distillation": Case(
        "TRL DistillationTrainer",
        "trl-distillation",
        False,
        "n/a: on-policy only (trains on its own completions of a `prompt` column; no lmbda)",
    ),
    "distill-onpolicy": Case("distill Trainer (fused loss)", "distill", True),
    "gkd-onpolicy": Case("TRL GKDTrainer", "gkd", True),
    "trl-distillation-onpolicy": Case("TRL DistillationTrainer (chunked loss)", "trl-distillation", True),
}


# --------------------------------------------------------------------------------------------------
# Data: a deterministic, real-looking chat set
# --------------------------------------------------------------------------------------------------

SUBJECTS = [
    "binary search", "the water cycle", "photosynthesis", "a hash table", "compound interest",
    "the French Revolution", "plate tectonics", "a neural network", "the immune system", "supply and demand",
    "a linked list", "climate change", "the printing press", "a solar eclipse", "recursion", "inflation",
]  # fmt: skip
QUESTIONS = [
    "Can you explain {s} to a beginner?",
    "What is {s}, and why does it matter?",
    "I am studying {s} for an exam next week. Can you give me a short, clear summary and one example?",
    "My friend says {s} is simple. Is that true? Explain it in plain words.",
    "Write a few sentences about {s} for a school report.",
]
PROMPT_CONTEXT = [
    "Please keep it short.",
    "I already know the basics of math.",
    "Use an example if you can.",
    "I learn best with step by step answers.",
]
ANSWER_SENTENCES = [
    "Sure! {S} is easiest to understand with a small example.",
    "First, think about what happens at each step and write it down.",
    "The key idea is that every part depends on the one before it.",
    "A common mistake is to skip the simple cases and start with the hard ones.",
    "In practice, people check the result with a quick test before they trust it.",
    "For example, take the numbers 3, 7 and 12 and follow them through the process.",
    "This is why teachers often draw a picture first.",
    "If you remember one thing, remember that the order matters.",
    "The same pattern shows up in many other places, from money to biology.",
    "You can try it yourself: change one input and see how the output moves.",
    "Most books describe {s} in two parts: what it is, and what it is used for.",
    "The history of {s} is longer than most people think.",
]


def build_rows(tokenizer: Any, count: int, row_tokens: tuple[int, int], seed: int) -> list[list[dict[str, str]]]:
    """``count`` chats (user question, assistant answer), each ``row_tokens`` long with the chat template."""
    rng = random.Random(seed)

    def length(messages: list[dict[str, str]]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    rows = []
    for _ in range(count):
        subject = rng.choice(SUBJECTS)
        question = " ".join([rng.choice(QUESTIONS), *rng.sample(PROMPT_CONTEXT, rng.randint(0, 2))])
        user = {"role": "user", "content": question.format(s=subject)}
        target = rng.randint(*row_tokens)
        sentences: list[str] = []
        while True:
            sentence = rng.choice(ANSWER_SENTENCES).format(s=subject, S=subject[0].upper() + subject[1:])
            chat = [user, {"role": "assistant", "content": " ".join([*sentences, sentence])}]
            if sentences and length(chat) > target:
                break
            sentences.append(sentence)
        rows.append([user, {"role": "assistant", "content": " ".join(sentences)}])
    return rows


def data_summary(tokenizer: Any, rows: list[list[dict[str, str]]]) -> str:
    """Rows, tokens per row and the completion share of the benchmark's data."""

    def length(messages: list[dict[str, str]], prompt: bool) -> int:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=prompt, tokenize=True, return_dict=True
        )
        return len(encoded["input_ids"])

    full = [length(row, prompt=False) for row in rows]
    prompt = [length(row[:-1], prompt=True) for row in rows]
    completion = 1 - sum(prompt) / sum(full)
    return (
        f"{len(rows)} chat rows (one epoch), {min(full)}-{max(full)} tokens each (mean {sum(full) / len(rows):.0f}, "
        f"{100 * completion:.0f}% assistant tokens); prompts {min(prompt)}-{max(prompt)} tokens"
    )


# --------------------------------------------------------------------------------------------------
# Measuring: tokens seen by the student, time per step, peak memory
# --------------------------------------------------------------------------------------------------


class TokenCounter:
    """Counts the non-padding tokens the student's decoder processes in training (grad-enabled) forwards.

    Hooked on the decoder (``model.model``) rather than the LM, so trainers that call the backbone
    directly (fused losses) are counted too; generation runs without gradients and is not counted.
    """

    def __init__(self, decoder: Any) -> None:
        self.tokens = 0
        decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.tokens += int(mask.sum())
        elif ids is not None:
            self.tokens += ids.numel()
        else:
            self.tokens += kwargs["inputs_embeds"].shape[:2].numel()


def foreign_cpu_seconds() -> float:
    """CPU seconds all processes but this one have used since boot (0 where ``/proc/stat`` is missing).

    The difference over the timed window says how busy the machine was with other work.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    busy = sum(fields[:3]) + sum(fields[5:8])  # user, nice, system, irq, softirq, steal (not idle, iowait)
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - (own.user + own.system)


def make_callback(counter: TokenCounter, warmup_steps: int, device: str) -> Any:
    """A ``TrainerCallback`` that records the logs and the tokens and wall time after the warm-up steps."""
    import torch
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict[str, float]] = []
            # (time, tokens, CPU seconds used by other processes) at the start of training and each step's end
            self.marks: list[tuple[float, int, float]] = []
            self.step_seconds: list[float] = []  # from each step's begin to its end (no data loading)
            self._begin = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), counter.tokens, foreign_cpu_seconds()))

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.step_seconds.append(now - self._begin)
            self.marks.append((now, counter.tokens, foreign_cpu_seconds()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

        def throughput(self) -> tuple[int, int, float, float]:
            """From the end of the warm-up steps to the end of the last step: steps, tokens, seconds, and the
            share of the machine's CPUs that other processes used meanwhile."""
            first = min(warmup_steps, len(self.marks) - 2)  # at least one timed step
            (start, tokens_start, foreign_start), (end, tokens_end, foreign_end) = self.marks[first], self.marks[-1]
            foreign_share = (foreign_end - foreign_start) / ((end - start) * (os.cpu_count() or 1))
            return len(self.marks) - 1 - first, tokens_end - tokens_start, end - start, max(foreign_share, 0.0)

    return Recorder()


# --------------------------------------------------------------------------------------------------
# The child process: build models and data, run one trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """What a child reports back to the parent."""

    case: str
    status: str  # ok, skipped, error
    timed_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    median_step_s: float = 0.0
    baseline_gib: float = 0.0
    peak_gib: float = 0.0
    final_loss: float | None = None
    final_kd_loss: float | None = None
    student_params: int = 0
    teacher_params: int = 0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def extra_gib(self) -> float:
        return self.peak_gib - self.baseline_gib


def build_model(spec: ModelSpec, vocab: int, seed: int, dtype: Any, tokenizer: Any) -> Any:
    """A random-weight causal LM from its config, seeded, with the tokenizer's special token ids."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.family]
    config = config_class(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def training_kwargs(args: argparse.Namespace, preset: Preset, output_dir: str) -> dict[str, Any]:
    """The ``TrainingArguments`` every trainer gets (TRL's own defaults overridden where they differ)."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": preset.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "seed": args.seed,
        "use_cpu": args.device == "cpu",
        "bf16": preset.dtype == "bf16",
        "gradient_checkpointing": False,
        "report_to": [],
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def build_trainer(case: Case, args: argparse.Namespace, preset: Preset, parts: dict[str, Any], output_dir: str) -> Any:
    """The case's trainer (imports its library here; raises ImportError when it is not installed)."""
    from datasets import Dataset

    common = training_kwargs(args, preset, output_dir)
    lmbda = 1.0 if case.on_policy else 0.0
    student, teacher, tokenizer = parts["student"], parts["teacher"], parts["tokenizer"]
    messages = Dataset.from_dict({"messages": parts["rows"]})
    if case.trainer in ("distill", "distill-dense"):
        from distill import DistillConfig, Trainer

        config = DistillConfig(
            **common,
            loss="jsd",
            beta=0.5,
            temperature=1.0,
            lmbda=lmbda,
            max_new_tokens=preset.max_new_tokens,
            generation_temperature=1.0,
            max_length=preset.max_length,
            loss_implementation="dense" if case.trainer == "distill-dense" else "fused",
            # The whole head, as TRL uses it. (By default distill compares only the rows the tokenizer can
            # produce, len(tokenizer) = 512 here, which would make this benchmark meaningless.)
            vocab_size=preset.vocab,
        )
        return Trainer(model=student, teacher=teacher, args=config, train_dataset=messages, processing_class=tokenizer)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if case.trainer == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            **common,
            lmbda=lmbda,
            beta=0.5,
            temperature=1.0,  # GKD's sampling temperature; its loss always uses 1
            max_new_tokens=preset.max_new_tokens,
            seq_kd=False,
            max_length=preset.max_length,
        )
        return GKDTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=messages, processing_class=tokenizer
        )
    if case.trainer == "trl-distillation":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, beta=0.5, temperature=1.0, max_completion_length=preset.max_new_tokens)
        prompts = Dataset.from_dict({"prompt": [row[:-1] for row in parts["rows"]]})
        return DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=prompts, processing_class=tokenizer
        )
    raise ValueError(f"Unknown trainer {case.trainer!r}.")


def mean_last(logs: list[dict[str, float]], key: str) -> float | None:
    """Mean of ``key`` over the last :data:`LAST_LOGGED` logs that have it."""
    values = [log[key] for log in logs if key in log][-LAST_LOGGED:]
    return sum(values) / len(values) if values else None


def run_child(args: argparse.Namespace) -> CaseResult:
    """Build models and data, construct the case's trainer, train, and measure."""
    import torch

    from distill.testing import train_tiny_tokenizer

    torch.set_num_threads(args.threads)
    preset, case = PRESETS[args.preset], CASES[args.case]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[preset.dtype]
    tokenizer = train_tiny_tokenizer()
    rows = build_rows(tokenizer, preset.batch * args.steps, preset.row_tokens, args.seed)
    teacher = build_model(preset.teacher, preset.vocab, args.seed, dtype, tokenizer).to(args.device)
    student = build_model(preset.student, preset.vocab, args.seed + 1, dtype, tokenizer).to(args.device)
    parts = {"tokenizer": tokenizer, "rows": rows, "teacher": teacher, "student": student}
    result = CaseResult(
        args.case,
        "ok",
        student_params=sum(p.numel() for p in student.parameters()),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        extra={"data": data_summary(tokenizer, rows)},
    )
    if args.device == "cuda":
        result.extra["gpu"] = torch.cuda.get_device_name()
    counter = TokenCounter(student.model)
    recorder = make_callback(counter, args.warmup_steps, args.device)
    from distill.evaluation.memory import PeakMemory  # imports torch: only in the case's own process

    meter = PeakMemory(args.device)
    meter.start()  # models and data exist; the trainer, optimizer state, activations and logits are measured
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as output_dir:
        try:
            trainer = build_trainer(case, args, preset, parts, output_dir)
        except ImportError as error:
            return CaseResult(args.case, "skipped", message=f"not importable ({error})")
        trainer.add_callback(recorder)
        trainer.train()
    result.baseline_gib, result.peak_gib = meter.baseline / GIB, meter.peak() / GIB
    result.timed_steps, result.tokens, result.seconds, foreign_share = recorder.throughput()
    result.extra["foreign_cpu"] = foreign_share
    result.median_step_s = sorted(recorder.step_seconds)[len(recorder.step_seconds) // 2]
    result.final_loss = mean_last(recorder.logs, "loss")
    result.final_kd_loss = mean_last(recorder.logs, "kd_loss")
    own = mean_last(recorder.logs, "tokens_per_second")
    if own is not None:
        result.extra["own_tokens_per_s"] = own
    return result


# --------------------------------------------------------------------------------------------------
# The parent: one subprocess per case, the table
# --------------------------------------------------------------------------------------------------


def run_case(args: argparse.Namespace, name: str) -> CaseResult:
    """Run one case in a fresh interpreter (or report it as not applicable without running it)."""
    if CASES[name].not_applicable:
        return CaseResult(name, "skipped", message=CASES[name].not_applicable)
    command = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--preset", args.preset]
    command += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    command += ["--threads", str(args.threads), "--device", args.device]
    log(f"[{name}] starting")
    # child_env fixes glibc's mmap threshold at 1 MiB, so RSS follows the live tensors (see harness.child_env).
    result, proc = run_in_child(command, label=f"[{name}]", env=child_env())
    if result is not None:
        return CaseResult(**result)
    return CaseResult(name, "error", message=f"failed ({failure(proc)}; see stderr)")


def versions() -> str:
    """Versions of the libraries involved (without importing them)."""
    packages = package_versions("torch", "transformers", "accelerate", "datasets", "trl", "distill")
    return f"python {platform.python_version()}, {packages}"


def machine(args: argparse.Namespace, gpu: str | None) -> str:
    """CPU model and cores, and the GPU (as a child named it) on CUDA."""
    device = f"GPU {gpu}" if args.device == "cuda" else "device cpu"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}; {device}"


def table(results: list[CaseResult], gkd: dict[bool, CaseResult | None], memory: str, new_tokens: int) -> list[str]:
    """The markdown table."""
    header = ["case", "policy", "timed steps", "tokens/s", "vs GKD tokens/s", "median step (s)",
              f"{memory} extra GiB (abs)", "vs GKD memory", "final loss"]  # fmt: skip
    rows = []
    for result in results:
        case = CASES[result.case]
        policy = f"on (lmbda=1, {new_tokens} new)" if case.on_policy else "off (lmbda=0)"
        if result.status != "ok":
            rows.append([case.label, policy, "—", result.message, "—", "—", "—", "—", "—"])
            continue
        peer = gkd.get(case.on_policy)
        speed = f"{result.tokens_per_s / peer.tokens_per_s:.2f}x" if peer and peer.tokens_per_s else "n/a"
        mem = f"{result.extra_gib / peer.extra_gib:.2f}x" if peer and peer.extra_gib > 0 else "n/a"
        loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        if result.final_kd_loss is not None and abs(result.final_kd_loss - (result.final_loss or 0)) > 1e-6:
            loss += f" (kd {result.final_kd_loss:.4f})"
        memory_cell = f"{result.extra_gib:.2f} ({result.peak_gib:.2f})"
        speed_cells = [result.timed_steps, f"{result.tokens_per_s:,.0f}", speed, f"{result.median_step_s:.2f}"]
        rows.append([case.label, policy, *speed_cells, memory_cell, mem, loss])
    return markdown_table(header, rows, align="llrrrrrrr")


def run_parent(args: argparse.Namespace) -> None:
    """Run every case, print (and optionally save) the report."""
    preset = PRESETS[args.preset]

    def describe(spec: ModelSpec, params: int) -> str:
        tied = ", tied embeddings" if spec.tie_embeddings else ""
        count = f"{params / 1e6:.1f}M params, " if params else ""
        return (
            f"{spec.family} {spec.layers}x{spec.hidden} (MLP {spec.intermediate}{tied}; {count}vocab {preset.vocab:,})"
        )

    results = [run_case(args, name) for name in args.cases]
    ok = [r for r in results if r.status == "ok"]
    gkd = {
        policy: next((r for r in ok if CASES[r.case].trainer == "gkd" and CASES[r.case].on_policy == policy), None)
        for policy in (False, True)
    }
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    first = ok[0] if ok else CaseResult("", "")
    lines = [
        f"## Distillation training, generalized JSD (beta=0.5, T=1): preset `{args.preset}`",
        "",
        f"- machine: {machine(args, first.extra.get('gpu'))}",
        f"- {versions()}",
        f"- teacher: {describe(preset.teacher, first.teacher_params)}; "
        f"student: {describe(preset.student, first.student_params)}; {preset.dtype}",
        f"- data: {first.extra.get('data', 'n/a')}; tokenizer `distill.testing.train_tiny_tokenizer()` (512 ids) "
        "under the models' wider vocabulary",
        f"- training: batch {preset.batch}, max_length {preset.max_length}, {args.steps} steps, lr 1e-4 (AdamW, "
        f"linear decay), seed {args.seed}, no gradient checkpointing, gradient accumulation 1; on-policy: "
        f"{preset.max_new_tokens} new tokens sampled at temperature 1",
        "",
        *table(results, gkd, memory, preset.max_new_tokens),
        "",
        f"tokens/s: non-padding tokens of the student's training forwards (prompt + completion; on-policy the "
        f"generated completion) from the end of step {args.warmup_steps} to the end of the last step, over the "
        "wall time between them (data collation, generation, teacher, loss, backward, optimizer, logging). "
        "median step: `on_step_begin` to `on_step_end` over all steps (warm-up included; no data collation). "
        f"{memory}: peak minus the baseline once the models and data exist, before the trainer is built "
        "(includes optimizer state and gradients); in brackets the absolute peak. final loss: mean logged `loss` "
        f"over the last {LAST_LOGGED} steps (one batch each, so noisy). vs GKD: against TRL GKDTrainer with the "
        "same policy.",
    ]
    own = [f"{r.case} {r.extra['own_tokens_per_s']:,.0f}" for r in ok if "own_tokens_per_s" in r.extra]
    busy = [f"{r.case} {100 * r.extra['foreign_cpu']:.0f}%" for r in ok if "foreign_cpu" in r.extra]
    if busy and args.device == "cpu":
        lines += [
            "",
            "Share of the machine's CPU time used by other processes during each timed window (from /proc/stat; "
            "near 0% on an idle machine): " + "; ".join(busy),
        ]
    if own:
        lines += [
            "",
            "distill's own `tokens_per_second` log (mean of the last 3 steps, for comparison): " + "; ".join(own),
        ]
    write_report("\n".join(lines), args.out)
    if args.out:
        log(f"wrote {args.out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=",".join(CASES))
    parser.add_argument("--steps", type=int, help="optimizer steps per case (default: the preset's)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of tokens/s (default 1, 2 on cuda)")
    add_common_args(parser, "device", "threads", "seed", "out")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    args.steps = args.steps or PRESETS[args.preset].steps
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.device == "cuda" else 1
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {','.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parent (all cases, the table) or child (``--case``) entry point."""
    args = parse_args(argv)
    if not args.case:
        run_parent(args)
        return
    try:
        result = run_child(args)
    except Exception as error:  # report the failure as a row; the traceback goes to stderr
        traceback.print_exc()
        result = CaseResult(args.case, "error", message=f"{type(error).__name__}: {str(error).splitlines()[0][:150]}")
    emit(asdict(result))


if __name__ == "__main__":
    main()

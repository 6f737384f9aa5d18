"""Distil Qwen2.5-Coder-32B-Instruct into Qwen2.5-Coder-14B-Instruct on code instructions, on the GPUs you rent.

Profiles (``--profile``), each one GPU target:

* ``h100_80gb``: one 80 GB GPU. The 32B teacher in 4-bit nf4 (~19 GB) runs next to a QLoRA student
  (14B in 4-bit, ~9 GB, LoRA rank 64 on every linear layer) every step.
* ``rtx_24gb``: one 24 GB GPU. The teacher cannot share the card with the student, so it runs once, in
  4-bit, over the data and its top-64 targets are cached on disk (``distill cache``); it is freed, then
  the QLoRA student (rank 32) trains from the cache (``CachedTeacher``).
* ``node_8xh100``: one node of 8 H100s. Full fine-tune of the 14B under FSDP2 with fp32 master weights and bf16
  autocast (at lr 1e-5 pure bf16 weights would barely move); the bf16 32B teacher is sharded over the 8 GPUs too
  (``teacher_sharding="fsdp"``).

Every ``DistillConfig`` field and every field of :class:`CodeRecipe` is a flag (or a key of a YAML file):

    python recipes/code_14b.py --profile h100_80gb --dataset ise-uiuc/Magicoder-Evol-Instruct-110K
    python recipes/code_14b.py --profile rtx_24gb --teacher_cache cache/coder32b   # built if missing
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/code_14b.py --profile node_8xh100
    python recipes/code_14b.py my_run.yaml
    python recipes/code_14b.py --tiny --profile rtx_24gb   # the same steps, tiny random models, a CPU, seconds

A standalone script: copy it and edit it; it needs only distill installed (``distill.recipes_support`` parses the
flags and profiles, checks the plan and writes the report; the data, the student, LoRA and the ``Trainer`` are
here). Profiles with 4-bit weights need bitsandbytes (``pip install 'distill[quant]'``); without it the recipe
stops at start-up, before any data is read.

At the end: held-out KD metrics in ``output_dir/heldout_metrics.json`` and, when the teacher runs in
this process, a report card in ``output_dir/report/``.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.data.rows import load_rows, split_heldout
from distill.recipes_support import Profile, begin, evaluate_and_report, log


@dataclass
class CodeRecipe:
    """What this recipe distils, on what data; the training itself is ``DistillConfig``."""

    profile: str = field(
        default="h100_80gb", metadata={"help": "GPU target: h100_80gb, rtx_24gb or node_8xh100 (see the docstring)."}
    )
    tiny: bool = field(
        default=False, metadata={"help": "Tiny random Qwen2 models and built-in code rows on a CPU: a smoke test."}
    )
    plan_only: bool = field(
        default=False, metadata={"help": "Only ask the planner whether this profile fits, print it, and exit."}
    )
    teacher: str = field(default="Qwen/Qwen2.5-Coder-32B-Instruct", metadata={"help": "Teacher: hub name or folder."})
    student: str = field(default="Qwen/Qwen2.5-Coder-14B-Instruct", metadata={"help": "Student: hub name or folder."})
    dataset: str = field(
        default="ise-uiuc/Magicoder-Evol-Instruct-110K",
        metadata={"help": "Code instructions: a hub dataset, or a local .jsonl / .parquet file."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    prompt_column: str = field(default="instruction", metadata={"help": "Column holding the instruction."})
    completion_column: str = field(default="response", metadata={"help": "Column holding the reference answer."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every row."})
    heldout_rows: int = field(default=512, metadata={"help": "Rows set aside for the held-out metrics."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Train on at most this many rows."})
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "rtx_24gb: the teacher's top-k cache folder (built there if missing); default output_dir."},
    )
    cache_top_k: int = field(default=64, metadata={"help": "rtx_24gb: top-k entries cached per token."})


# Every profile: a JSD between teacher and student on the completions, bf16 on the GPU.
BASE_TRAINING: dict[str, Any] = dict(
    loss="jsd",
    beta=0.5,
    num_train_epochs=1,
    eval_strategy="no",  # evaluated once at the end (evaluate_and_report)
)

PROFILES: dict[str, Profile] = {
    "h100_80gb": Profile(
        name="h100_80gb",
        description="one 80 GB GPU: 4-bit teacher in-process + QLoRA student",
        gpu="H100-80GB",
        num_gpus=1,
        teacher_mode="in_process",
        student_quantization="4bit",
        lora_r=64,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/code_14b.py "
        "--profile h100_80gb",
        training=dict(
            teacher_quantization="4bit",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=8,
            max_length=2048,
            learning_rate=1e-4,
        ),
    ),
    "rtx_24gb": Profile(
        name="rtx_24gb",
        description="one 24 GB GPU: teacher top-k cache built first, then a QLoRA student",
        gpu="RTX4090-24GB",
        num_gpus=1,
        teacher_mode="cache",
        student_quantization="4bit",
        lora_r=32,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/code_14b.py "
        "--profile rtx_24gb",
        training=dict(
            teacher_quantization="4bit",  # how the cache is built: 32B in nf4 fits the card alone
            sparse_tail="bucket",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=32,
            max_length=2048,
            learning_rate=1e-4,
        ),
    ),
    "node_8xh100": Profile(
        name="node_8xh100",
        description="8 x 80 GB GPUs: FSDP2 full fine-tune, bf16 teacher sharded over the GPUs",
        gpu="H100-80GB",
        num_gpus=8,
        teacher_mode="in_process",
        student_quantization="none",
        lora_r=None,
        launch="accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/code_14b.py "
        "--profile node_8xh100",
        sharding="fsdp2",
        training=dict(
            teacher_sharding="fsdp",
            # fp32 master weights under bf16 autocast (the planner's "mixed"): at lr 1e-5 an Adam step is below
            # half a bf16 ULP of most weights, so pure bf16 weights would barely move.
            student_dtype="float32",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            max_length=4096,
            learning_rate=1e-5,
        ),
    ),
}

TINY_RECIPE: dict[str, Any] = dict(heldout_rows=8)


def tiny_code_rows(count: int) -> list[dict[str, str]]:
    """``count`` small code instructions with their solutions, in the default dataset's columns."""
    templates = [
        ("Write a Python function `add_{n}(x)` that returns x plus {n}.", "def add_{n}(x):\n    return x + {n}\n"),
        (
            "Write a Python function `times_{n}(x)` that multiplies x by {n}.",
            "def times_{n}(x):\n    return x * {n}\n",
        ),
        (
            "Write a function `is_multiple_of_{n}(x)` that checks whether x is a multiple of {n}.",
            "def is_multiple_of_{n}(x):\n    return x % {n} == 0\n",
        ),
        (
            "Write a function `first_{n}(items)` that returns the first {n} items of a list.",
            "def first_{n}(items):\n    return items[:{n}]\n",
        ),
    ]
    rows = []
    for index in range(count):
        instruction, response = templates[index % len(templates)]
        n = 2 + index // len(templates)
        rows.append({"instruction": instruction.format(n=n), "response": response.format(n=n)})
    return rows


def to_messages(dataset: Any, recipe: CodeRecipe) -> Any:
    """Chat rows (``messages``: optional system, user instruction, assistant answer) from the two columns."""
    if "messages" in dataset.column_names:
        return dataset
    missing = {recipe.prompt_column, recipe.completion_column} - set(dataset.column_names)
    if missing:
        raise SystemExit(
            f"The dataset has no column(s) {sorted(missing)}; its columns are {dataset.column_names}. Set "
            "--prompt_column and --completion_column."
        )

    def row(example: dict[str, Any]) -> dict[str, Any]:
        system = [{"role": "system", "content": recipe.system_prompt}] if recipe.system_prompt else []
        user = {"role": "user", "content": example[recipe.prompt_column]}
        return {"messages": [*system, user, {"role": "assistant", "content": example[recipe.completion_column]}]}

    return dataset.map(row, remove_columns=dataset.column_names)


def cached_teacher(cache_dir: str, teacher: str, tokenizer: Any, rows: Any, config: Any, top_k: int) -> Any:
    """A ``CachedTeacher`` over ``rows``; the cache is built first (teacher loaded, run once, freed) if missing.

    Only the teacher is on the GPU while the cache is built, and only the student while training: that is
    what lets a 32B teacher and a 14B student share one 24 GB card.
    """
    import torch

    from distill.cache import build_cache
    from distill.formats.reader import read_manifest
    from distill.teachers import CachedTeacher

    manifest = read_manifest(Path(cache_dir)) if Path(cache_dir, "manifest.json").exists() else None
    if manifest is None or not manifest.get("complete"):
        log(
            f"building the teacher cache in {cache_dir} (same as: distill cache --teacher {teacher} --dataset "
            f"<rows> --out {cache_dir} --quantization {config.teacher_quantization} --max-length {config.max_length})"
        )
        build_cache(
            teacher,
            rows,
            cache_dir,
            tokenizer=tokenizer,
            top_k=top_k,
            max_length=config.max_length,
            completion_only_loss=config.completion_only_loss,
            dtype=config.teacher_dtype,
            quantization=config.teacher_quantization,
            device=None if config.use_cpu else config.device,
            progress=not config.disable_tqdm,
        )
        gc.collect()  # the teacher is gone: give its memory back before the student loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return CachedTeacher(cache_dir, tokenizer=tokenizer)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the held-out metrics (also written to ``output_dir/heldout_metrics.json``)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from distill import Trainer
    from distill.models import load_causal_lm

    # 1. Flags (or YAML) over the profile, models (tiny random ones with --tiny), and the planner's check that
    # they fit, before any weight or data is loaded, so a bad profile costs seconds.
    start = begin(CodeRecipe, PROFILES, argv, BASE_TRAINING, TINY_RECIPE)
    recipe, config, profile = start.recipe, start.config, start.profile
    if recipe.plan_only:
        return start.plan_summary()
    tokenizer = AutoTokenizer.from_pretrained(start.student)
    device = None if config.use_cpu else config.device  # this process's GPU under `accelerate launch`

    # 2. Data: chat rows, a held-out split for the metrics at the end.
    rows = (
        datasets.Dataset.from_list(tiny_code_rows(48))
        if recipe.tiny
        else load_rows(recipe.dataset, recipe.dataset_split)
    )
    train, heldout = split_heldout(to_messages(rows, recipe), recipe.heldout_rows, recipe.max_train_rows, config.seed)
    log(f"{len(train)} training rows, {len(heldout)} held-out rows")

    # 3. The teacher's targets: the model itself every step (loaded by the Trainer in teacher_dtype /
    # teacher_quantization), or its top-k computed once into a cache.
    teacher: Any = start.teacher
    if profile.teacher_mode == "cache":
        cache_dir = recipe.teacher_cache or str(Path(config.output_dir) / "teacher_cache")
        all_rows = datasets.concatenate_datasets([train, heldout])  # held-out rows too: evaluate() reads them
        teacher = cached_teacher(cache_dir, teacher, tokenizer, all_rows, config, recipe.cache_top_k)

    # 4. The student: QLoRA's 4-bit base is loaded here; a full-precision one is loaded by the Trainer in
    # student_dtype (float32 for the full fine-tune: fp32 master weights, bf16 autocast).
    student: Any = start.student
    if profile.student_quantization == "4bit":
        student = load_causal_lm(student, dtype=config.student_dtype, quantization="4bit", device=device)
    lora = None
    if profile.lora_r is not None:
        lora = LoraConfig(
            r=profile.lora_r, lora_alpha=2 * profile.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )

    # 5. Train (resumes from --resume_from_checkpoint when given), then save the student (or its adapters).
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)

    # 6. Held-out KD metrics and, with the teacher model in this process, the report card.
    teacher_model = getattr(trainer.teacher, "model", None)  # None for the cached teacher
    return evaluate_and_report(trainer, heldout, tokenizer, teacher_model, f"code_14b-{profile.name}")


if __name__ == "__main__":
    main()

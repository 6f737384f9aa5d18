"""Distil a 7B chat model into a 1.5B one on multi-turn conversations, on one 24 GB GPU.

Profiles (``--profile``):

* ``rtx_24gb`` (default): one 24 GB GPU (RTX 4090, L4, A10G). Qwen2.5-7B-Instruct in 4-bit nf4 (~5 GB)
  runs next to Qwen2.5-1.5B-Instruct, which trains through LoRA adapters (rank 64) on bf16 weights.
* ``h100_80gb``: one 80 GB GPU. The teacher in bf16 (~15 GB) and a full fine-tune of the student (fp32 master
  weights, bf16 autocast).

Data: any ``messages`` dataset (default ``HuggingFaceH4/ultrachat_200k``, split ``train_sft``); the loss
covers every assistant turn.

    python recipes/chat_24gb.py                                   # rtx_24gb, ultrachat
    python recipes/chat_24gb.py --dataset my_chats.jsonl --student Qwen/Qwen2.5-0.5B-Instruct
    python recipes/chat_24gb.py --profile h100_80gb --plan_only   # does it fit? (no weights loaded)
    python recipes/chat_24gb.py --tiny                            # the same steps, tiny models, a CPU, seconds
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distill.data.rows import load_rows, split_heldout
from distill.recipes_support import Profile, begin, evaluate_and_report, log


@dataclass
class ChatRecipe:
    """What this recipe distils, on what data; the training itself is ``DistillConfig``."""

    profile: str = field(default="rtx_24gb", metadata={"help": "GPU target: rtx_24gb or h100_80gb."})
    tiny: bool = field(default=False, metadata={"help": "Tiny random Qwen2 models and built-in chats on a CPU."})
    plan_only: bool = field(default=False, metadata={"help": "Only ask the planner whether this profile fits."})
    teacher: str = field(default="Qwen/Qwen2.5-7B-Instruct", metadata={"help": "Teacher: hub name or folder."})
    student: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Student: hub name or folder."})
    dataset: str = field(
        default="HuggingFaceH4/ultrachat_200k",
        metadata={"help": "Chats with a `messages` column: a hub dataset or a local .jsonl / .parquet file."},
    )
    dataset_split: str = field(default="train_sft", metadata={"help": "Split of a hub dataset."})
    heldout_rows: int = field(default=512, metadata={"help": "Conversations set aside for the held-out metrics."})
    max_train_rows: int | None = field(default=50_000, metadata={"help": "Train on at most this many chats."})


BASE_TRAINING: dict[str, Any] = dict(
    loss="jsd",
    beta=0.5,
    max_length=2048,
    num_train_epochs=1,
)

PROFILES: dict[str, Profile] = {
    "rtx_24gb": Profile(
        name="rtx_24gb",
        description="one 24 GB GPU: 4-bit teacher in-process + LoRA on the bf16 student",
        gpu="RTX4090-24GB",
        num_gpus=1,
        teacher_mode="in_process",
        student_quantization="none",
        lora_r=64,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/chat_24gb.py",
        training=dict(
            teacher_quantization="4bit",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=8,
            learning_rate=2e-4,
        ),
    ),
    "h100_80gb": Profile(
        name="h100_80gb",
        description="one 80 GB GPU: bf16 teacher in-process + full fine-tune of the student",
        gpu="H100-80GB",
        num_gpus=1,
        teacher_mode="in_process",
        student_quantization="none",
        lora_r=None,
        launch="accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/chat_24gb.py "
        "--profile h100_80gb",
        # fp32 master weights under bf16 autocast: at lr 1e-5 pure bf16 weights would barely move.
        training=dict(
            student_dtype="float32", per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=1e-5
        ),
    ),
}

TINY_RECIPE: dict[str, Any] = dict(heldout_rows=8, max_train_rows=None)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the held-out metrics (also written to ``output_dir/heldout_metrics.json``)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from distill import Trainer
    from distill.testing import arithmetic_rows

    start = begin(ChatRecipe, PROFILES, argv, BASE_TRAINING, TINY_RECIPE)  # checks the plan before any load
    recipe, config, profile = start.recipe, start.config, start.profile
    if recipe.plan_only:
        return start.plan_summary()
    tokenizer = AutoTokenizer.from_pretrained(start.student)

    if recipe.tiny:
        rows = datasets.Dataset.from_list(arithmetic_rows(48, layout="messages"))
    else:
        rows = load_rows(recipe.dataset, recipe.dataset_split)
    if "messages" not in rows.column_names:
        raise SystemExit(f"This recipe trains on chat rows with a `messages` column; got {rows.column_names}.")
    rows = rows.select_columns(["messages"])
    train, heldout = split_heldout(rows, recipe.heldout_rows, recipe.max_train_rows, config.seed)
    log(f"{len(train)} training chats, {len(heldout)} held-out chats")

    # Both models as paths: the Trainer loads the teacher with teacher_dtype / teacher_quantization and the
    # student with student_dtype (bf16 under LoRA adapters, which peft keeps in fp32; fp32 for a full fine-tune).
    lora = None
    if profile.lora_r is not None:
        lora = LoraConfig(
            r=profile.lora_r, lora_alpha=2 * profile.lora_r, lora_dropout=0.0, target_modules="all-linear"
        )
    trainer = Trainer(
        model=start.student,
        teacher=start.teacher,
        args=config,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    return evaluate_and_report(
        trainer, heldout, tokenizer, getattr(trainer.teacher, "model", None), f"chat-{profile.name}"
    )


if __name__ == "__main__":
    main()

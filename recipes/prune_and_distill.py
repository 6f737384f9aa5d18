"""Make a student worth keeping: prune a teacher (width + depth), heal it by distillation, then distil the task.

The Minitron pipeline (NVIDIA, arXiv 2407.14679, 2408.11796) on plain ``transformers`` models:

1. **prune**: score neurons, heads, hidden channels and blocks on calibration rows of general text and cut the
   teacher to a target shape (``distill.pruning``; re-fitted by least squares, saved as a standard model);
2. **heal**: distil the teacher into the pruned student on general text, logits plus hidden states mapped
   through the pruning record (``hidden_loss_weight``);
3. **task**: distil the teacher into the healed student on the task's rows (logits).

The pruned and healed students go to ``output_dir/pruned/`` and ``output_dir/healed/``, the final one to
``output_dir`` itself; a rerun skips the pruning when it is done, and a training stage interrupted mid-way
resumes from its last checkpoint.

Profiles (``--profile``):

* ``llama8b_to_4b``: Llama-3.1-8B -> the Llama-3.1-Minitron-4B-Width shape (hidden 3072, MLP 9216, 32 layers),
  on 8 x H100 with FSDP2, teacher sharded.
* ``coder14b_to_7b`` (default): Qwen2.5-Coder-14B-Instruct -> ~7.5B (hidden 4096, 32/8 heads, MLP 7168, 48
  layers), on 8 x H100 with FSDP2.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/prune_and_distill.py
    python recipes/prune_and_distill.py --profile llama8b_to_4b --plan_only   # fits? (no weights loaded)
    python recipes/prune_and_distill.py --tiny                                # the same stages, tiny models, a CPU
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import DistillConfig, Trainer
from distill.data.rows import load_rows, split_heldout
from distill.recipes_support import Profile, check_plan, evaluate_and_report, log, parse, print_plan, tiny_models


@dataclass
class PruneRecipe:
    """What is pruned into what, on which data; each training stage is ``DistillConfig``."""

    profile: str = field(default="coder14b_to_7b", metadata={"help": "llama8b_to_4b or coder14b_to_7b."})
    tiny: bool = field(default=False, metadata={"help": "Tiny random Qwen2 models and built-in rows on a CPU."})
    plan_only: bool = field(default=False, metadata={"help": "Only ask the planner whether the heal stage fits."})
    teacher: str = field(default="Qwen/Qwen2.5-Coder-14B-Instruct", metadata={"help": "Teacher: hub name or folder."})
    target: str = field(
        default="layers=48,hidden=4096,heads=32,kv_heads=8,mlp=7168",
        metadata={"help": "Pruned shape (layers=,hidden=,heads=,kv_heads=,mlp=) or a fraction of the parameters."},
    )
    general_dataset: str = field(
        default="HuggingFaceFW/fineweb-edu",
        metadata={"help": "General text (a `text` column) for calibration and healing."},
    )
    general_subset: str | None = field(default="sample-10BT", metadata={"help": "Subset of the general dataset."})
    calibration_rows: int = field(default=1024, metadata={"help": "General rows scored for pruning importance."})
    heal_rows: int = field(default=200_000, metadata={"help": "General rows for the heal stage."})
    heal_hidden_weight: float = field(default=1.0, metadata={"help": "hidden_loss_weight of the heal stage."})
    task_dataset: str = field(
        default="ise-uiuc/Magicoder-OSS-Instruct-75K", metadata={"help": "Task rows (messages or prompt/completion)."}
    )
    task_split: str = field(default="train", metadata={"help": "Split of the task dataset."})
    heldout_rows: int = field(default=512, metadata={"help": "Task rows set aside for the held-out metrics."})
    max_task_rows: int | None = field(default=50_000, metadata={"help": "Train the task stage on at most this many."})


BASE_TRAINING: dict[str, Any] = dict(loss="forward_kl", max_length=2048, num_train_epochs=1)

_FSDP = "accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/prune_and_distill.py"


def _node_8xh100(name: str, launch: str) -> Profile:
    """One 8 x H100 node: the student FSDP2-sharded (full fine-tune, fp32 master weights), the teacher sharded."""
    return Profile(
        name=name, description="8 x H100: FSDP2 student (full fine-tune, fp32 master weights), teacher sharded",
        gpu="H100-80GB", num_gpus=8, teacher_mode="in_process", student_quantization="none", lora_r=None,
        launch=launch, sharding="fsdp2",
        # fp32 master weights + bf16 autocast: small Adam steps still move them (pure bf16 weights would not).
        training=dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, learning_rate=1e-4,
                      student_dtype="float32", bf16=True, gradient_checkpointing=True, teacher_dtype="bfloat16"),
    )  # fmt: skip


PROFILES: dict[str, Profile] = {
    "coder14b_to_7b": _node_8xh100("coder14b_to_7b", _FSDP),
    "llama8b_to_4b": _node_8xh100("llama8b_to_4b", f"{_FSDP} --profile llama8b_to_4b"),
}
PROFILE_RECIPE = {"llama8b_to_4b": dict(teacher="meta-llama/Llama-3.1-8B", target="hidden=3072,mlp=9216")}
TINY_RECIPE: dict[str, Any] = dict(
    target="0.5", calibration_rows=16, heal_rows=48, heldout_rows=8, max_task_rows=None, general_subset=None
)


def planned_student(teacher: str, target: str) -> Any:
    """What the planner sizes the pruned student by, before any weights exist.

    An explicit shape of a catalogue model (or a local folder) is read offline from the teacher's shape;
    a parameter budget needs the teacher's ``config.json`` and plans the widest candidate shape (the
    most activations).
    """
    import dataclasses

    from transformers import AutoConfig

    from distill.planning import model_spec
    from distill.pruning import candidate_shapes, pruned_config
    from distill.pruning.cli import SHAPE_FIELDS, parse_target
    from distill.pruning.search import resolve_target

    parsed = parse_target(target)
    if isinstance(parsed, dict):
        try:
            spec = model_spec(teacher)
        except KeyError:
            spec = None
        if spec is not None:
            names = {"num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
                     "num_key_value_heads": "num_kv_heads", "intermediate_size": "intermediate_size"}  # fmt: skip
            assert set(names) == set(SHAPE_FIELDS.values())
            return dataclasses.replace(spec, name=f"{spec.name} pruned", **{names[k]: v for k, v in parsed.items()})
    config = AutoConfig.from_pretrained(teacher)
    shape, budget = resolve_target(config, parsed, "non_embedding")
    if shape is None:
        shape = candidate_shapes(config, budget)[0]
    return pruned_config(config, shape, list(range(shape.num_layers))).to_dict()


def log_pruning_cost(teacher: str, recipe: PruneRecipe, config: DistillConfig) -> None:
    """Print what the pruning pass will take (teacher, statistics, activations; FLOPs), from the shape alone."""
    from distill.planning import model_spec, pruning_cost

    try:
        spec = model_spec(teacher)
    except KeyError:
        return  # not in the planner's catalogue nor a local folder: the pass is sized when it runs
    length = min(config.max_length, 4096)
    cost = pruning_cost(spec, calibration_tokens=recipe.calibration_rows * length, batch_tokens=8 * length,
                        dtype_bytes=4 if config.teacher_dtype in ("float32", "fp32") else 2)  # fmt: skip
    log(cost.summary())


def stage_config(config: DistillConfig, stage: str, **changes: Any) -> DistillConfig:
    """The run's ``DistillConfig`` for one stage: its own output folder, plus the stage's changes."""
    import dataclasses

    return dataclasses.replace(config, output_dir=str(Path(config.output_dir) / stage), **changes)


def prune_stage(teacher: str, target: str, rows: Any, folder: Path, recipe: PruneRecipe, config: DistillConfig) -> str:
    """Prune the teacher and save the student (skipped when ``folder`` already holds one: ``pruning.json`` is
    written last, so a folder with it is complete)."""
    if (folder / "pruning.json").exists():
        log(f"prune: {folder} already holds the pruned student; skipping")
        return str(folder)
    from distill.models import load_causal_lm
    from distill.models.loading import load_tokenizer
    from distill.pruning import calibration_batches, prune
    from distill.pruning.cli import parse_target

    tokenizer = load_tokenizer(teacher)
    batches = calibration_batches(rows, tokenizer, max_length=min(config.max_length, 4096), batch_size=8,
                                  max_rows=recipe.calibration_rows)  # fmt: skip
    device = None if config.use_cpu else config.device  # this process's GPU under `accelerate launch`
    model = load_causal_lm(teacher, dtype=config.teacher_dtype, device=device)
    result = prune(model, batches, parse_target(target), progress=not config.disable_tqdm)
    log("prune:\n" + result.table())
    result.save(folder, tokenizer)
    return str(folder)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three stages; returns the held-out metrics of the final student."""
    import datasets
    from accelerate import PartialState

    from distill.models.loading import load_tokenizer
    from distill.testing import arithmetic_rows

    recipe, config, profile = parse(PruneRecipe, PROFILES, argv, BASE_TRAINING, TINY_RECIPE)
    for key, value in PROFILE_RECIPE.get(profile.name, {}).items():
        if getattr(recipe, key) == getattr(PruneRecipe, key):  # the profile's default, unless the user set one
            setattr(recipe, key, value)
    teacher = tiny_models(Path(config.output_dir) / "tiny_models")[0] if recipe.tiny else recipe.teacher
    log(f"profile {profile.name}: {profile.description}; output in {config.output_dir}")
    # The heal stage is the heaviest (teacher + student + hidden states): plan it before any weight loads.
    heal = stage_config(config, "healed", hidden_loss_weight=recipe.heal_hidden_weight)
    plan = check_plan(heal, profile, teacher, planned_student(teacher, recipe.target))
    log_pruning_cost(teacher, recipe, config)
    if recipe.plan_only:
        print_plan(plan)
        return {"plan": plan.to_dict()}

    if recipe.tiny:
        general = datasets.Dataset.from_list(arithmetic_rows(64, layout="text"))
        task = datasets.Dataset.from_list(arithmetic_rows(48, layout="messages"))
    else:
        general = load_rows(recipe.general_dataset, "train", recipe.general_subset).select_columns(["text"])
        task = load_rows(recipe.task_dataset, recipe.task_split)
    calibration = general.select(range(min(recipe.calibration_rows, len(general))))
    heal_rows = general.select(range(len(calibration), min(len(general), len(calibration) + recipe.heal_rows)))
    task_train, heldout = split_heldout(task, recipe.heldout_rows, recipe.max_task_rows, config.seed)
    tokenizer = load_tokenizer(teacher)

    # One process prunes (on its own GPU); under `accelerate launch` the others wait for its folder.
    pruned = str(Path(config.output_dir) / "pruned")
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            prune_stage(teacher, recipe.target, calibration, Path(pruned), recipe, config)

    log(f"heal: logits + hidden states (weight {heal.hidden_loss_weight}) on {len(heal_rows)} general rows")
    trainer = Trainer(model=pruned, teacher=teacher, args=heal, train_dataset=heal_rows, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=_resume(heal))
    trainer.save_model(heal.output_dir)

    task_config = config  # the final student goes where every recipe puts it: output_dir
    log(f"task: logits on {len(task_train)} task rows")
    trainer = Trainer(model=heal.output_dir, teacher=trainer.teacher, args=task_config, train_dataset=task_train,
                      eval_dataset=heldout, processing_class=tokenizer)  # fmt: skip
    trainer.train(resume_from_checkpoint=_resume(task_config))
    trainer.save_model(task_config.output_dir)
    return evaluate_and_report(
        trainer, heldout, tokenizer, getattr(trainer.teacher, "model", None), f"pruned-{profile.name}"
    )


def _resume(config: DistillConfig) -> bool:
    """Resume a stage from its newest complete checkpoint when it has one."""
    return any(Path(config.output_dir).glob("checkpoint-*"))


if __name__ == "__main__":
    main()

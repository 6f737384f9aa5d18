"""What the recipes share: profiles, the command line, ``--tiny`` models and data, the cache stage, the report.

A recipe file (``code_14b.py``, ``chat_24gb.py``, ``reasoning.py``) reads top to bottom and owns its
choices (models, data, profiles); this module holds only the plumbing they would otherwise each
repeat. Nothing here hides a training loop: training is ``distill.Trainer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers.hf_argparser import string_to_bool

from distill import DistillConfig, Trainer
from distill.checks import InputError, arg_bool, check_bool, check_float, check_int

# ---- profiles -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """One GPU target: where the teacher's targets come from, how the student is held, and batch sizes.

    Attributes:
        name: the ``--profile`` value.
        description: one line for ``--help`` and the logs.
        gpu: the planner's GPU name (``distill.planning``), e.g. ``"H100-80GB"``.
        num_gpus: GPUs the profile is planned for (processes of ``accelerate launch``).
        teacher_mode: ``"in_process"`` (the teacher runs next to the student every step) or ``"cache"``
            (its top-k targets are computed once, stored, and the teacher is freed before training).
        student_quantization: ``"4bit"`` means QLoRA (needs ``lora_r``); ``"none"`` keeps bf16 weights.
        lora_r: LoRA rank; ``None`` trains every weight of the student.
        launch: the command that starts this profile on its machine.
        sharding: how the launch config spreads the student (``"none"``, ``"ddp"``, ``"fsdp2"``), for the planner.
        training: ``DistillConfig`` defaults of the profile; any flag or YAML key overrides them.
    """

    name: str
    description: str
    gpu: str
    num_gpus: int
    teacher_mode: str
    student_quantization: str
    lora_r: int | None
    launch: str
    sharding: str = "none"
    training: dict[str, Any] = field(default_factory=dict)


# What every recipe trains with on a GPU unless it (or its profile, or the user) says otherwise.
COMMON_TRAINING: dict[str, Any] = dict(
    bf16=True,
    teacher_dtype="bfloat16",
    student_dtype="bfloat16",
    gradient_checkpointing=True,  # at 1-4k tokens the activations of a 1.5-14B student dwarf everything else
    lr_scheduler_type="cosine",
    warmup_steps=0.03,  # a fraction of the run's steps
    logging_steps=10,
    save_steps=500,
    save_total_limit=2,
    report_to="none",
)

# What --tiny changes on top of a profile: sizes and the device only, never the structure (teacher mode,
# quantization, LoRA, sharding stay the profile's).
TINY_TRAINING: dict[str, Any] = dict(
    use_cpu=True,
    bf16=False,
    teacher_dtype="float32",
    student_dtype="float32",
    max_steps=4,
    max_length=256,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=1e-2,
    warmup_steps=0,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
)


def parse(
    recipe_type: type,
    profiles: dict[str, Profile],
    argv: Sequence[str] | None,
    base_training: dict[str, Any],
    tiny_recipe: dict[str, Any] | None = None,
) -> tuple[Any, DistillConfig, Profile]:
    """Parse the recipe dataclass and ``DistillConfig`` from flags or one YAML file, with the profile's defaults.

    Precedence, lowest first: :data:`COMMON_TRAINING`, ``base_training`` (the recipe's), the profile's
    ``training``, ``TINY_TRAINING`` (with ``--tiny``), then what the user wrote (flags, or the YAML file's keys).

    Args:
        recipe_type: the recipe's ``@dataclass`` (with ``profile``, ``tiny`` and ``plan_only`` fields).
        profiles: the recipe's profiles by name.
        argv: command-line arguments (default ``sys.argv[1:]``); a single ``.yaml``/``.yml`` path reads a file.
        base_training: ``DistillConfig`` defaults the recipe sets for every profile.
        tiny_recipe: recipe fields that ``--tiny`` changes (e.g. fewer held-out rows).
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((recipe_type, DistillConfig), allow_abbrev=False)
    for action in parser._actions:  # one bool parser for every flag, the same as the pre-parser's below
        if action.type is string_to_bool:
            action.type = arg_bool
    from_yaml = len(argv) == 1 and argv[0].endswith((".yaml", ".yml"))
    try:
        if from_yaml:
            import yaml

            user = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")) or {}
            user = _yaml_bools(user, recipe_type)
            name = str(user.get("profile", recipe_type.profile))
            tiny, plan_only = bool(user.get("tiny", False)), bool(user.get("plan_only", False))
        else:
            pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            pre.add_argument("--profile", default=recipe_type.profile)
            pre.add_argument("--tiny", nargs="?", const="true", default="false")
            pre.add_argument("--plan_only", "--plan-only", dest="plan_only", nargs="?", const="true", default="false")
            known, _ = pre.parse_known_args(argv)
            name = known.profile
            tiny, plan_only = check_bool(known.tiny, "--tiny"), check_bool(known.plan_only, "--plan_only")
    except InputError as error:
        refuse(str(error))
    if name not in profiles:
        refuse(f"--profile {name!r} is not one of {sorted(profiles)}.")
    profile = profiles[name]
    tiny_defaults = {**TINY_TRAINING, **(tiny_recipe or {})} if tiny else {}
    defaults = {**COMMON_TRAINING, **base_training, **profile.training, **tiny_defaults}
    known_fields = {f.name for t in (recipe_type, DistillConfig) for f in dataclasses.fields(t)}
    unknown = sorted(set(defaults) - known_fields)
    if unknown:  # a typo (or a field transformers renamed) would otherwise be dropped silently
        raise ValueError(f"Profile {name} sets unknown fields {unknown}.")
    if plan_only and not torch.cuda.is_available():
        # Only so that TrainingArguments accepts bf16 on a laptop: the plan is for the profile's GPU either way.
        defaults["use_cpu"] = True
    defaults.setdefault("output_dir", tempfile.mkdtemp(prefix=f"distill-{name}-") if tiny else f"out/{name}")
    try:  # DistillConfig checks its fields while it is built: a bad value is one line, before any model loads
        if from_yaml:
            recipe, config = parser.parse_dict({**defaults, **user})
        else:
            parser.set_defaults(**defaults)
            recipe, config = parser.parse_args_into_dataclasses(argv)
        check_recipe_numbers(recipe)
    except ValueError as error:
        refuse(str(error))
    return recipe, config, profile


def refuse(message: str) -> NoReturn:
    """End a recipe over bad input: one line on stderr, exit code 2 (as argparse and ``distill`` do)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _yaml_bools(user: dict[str, Any], recipe_type: type) -> dict[str, Any]:
    """A YAML file's values of boolean fields through the one bool parser (``tiny: "no"`` is False, not truthy)."""
    boolean = {f.name for t in (recipe_type, DistillConfig) for f in dataclasses.fields(t) if f.type in (bool, "bool")}
    return {key: check_bool(value, key) if key in boolean else value for key, value in user.items()}


def check_recipe_numbers(recipe: Any) -> None:
    """The recipe's own numbers, before anything loads: every count (int) >= 1, every float finite and >= 0.

    Raises:
        InputError: naming the field (e.g. ``cache_top_k=-4``).
    """
    for spec in dataclasses.fields(recipe):
        value = getattr(recipe, spec.name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            check_int(value, spec.name)
        elif isinstance(value, float):
            check_float(value, spec.name, minimum=0)


@dataclass
class Start:
    """A parsed recipe run whose plan was checked: what :func:`begin` returns."""

    recipe: Any
    config: DistillConfig
    profile: Profile
    teacher: str  # the teacher's path or hub name (a tiny model's folder with --tiny)
    student: str
    plan: Any  # the planner's Plan, or None when the planner is unavailable

    def plan_summary(self) -> dict[str, Any]:
        """What ``main`` returns for ``--plan_only``."""
        return {"plan": None if self.plan is None else self.plan.to_dict()}


def begin(
    recipe_type: type,
    profiles: dict[str, Profile],
    argv: Sequence[str] | None,
    base_training: dict[str, Any],
    tiny_recipe: dict[str, Any] | None = None,
) -> Start:
    """Parse (:func:`parse`), log the profile, swap in tiny models with ``--tiny``, and check the plan.

    The plan is checked before any weight or data is loaded, so a profile that does not fit costs seconds.
    """
    recipe, config, profile = parse(recipe_type, profiles, argv, base_training, tiny_recipe)
    log(f"profile {profile.name}: {profile.description}; output in {config.output_dir}")
    teacher, student = recipe.teacher, recipe.student
    if recipe.tiny:  # tiny random models of the same class (Qwen2), saved as folders
        teacher, student, _ = tiny_models(Path(config.output_dir) / "tiny_models")
    return Start(recipe, config, profile, teacher, student, check_plan(config, profile, teacher, student))


def log(message: str) -> None:
    """Print on the main process only (every rank runs the recipe under ``accelerate launch``)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[recipe] {message}", flush=True)


# ---- the start-up check -----------------------------------------------------------------------------------


def check_plan(config: DistillConfig, profile: Profile, teacher: str, student: Any) -> Any:
    """Ask the planner (``distill.planning``) whether this run fits the profile's GPUs, before loading weights.

    Raises ``SystemExit`` with the planner's message (what takes the memory, what to change) when the run
    does not fit. Skipped, with a line saying so, when this version of distill has no planner.

    Returns:
        The planner's ``Plan``, or ``None`` when skipped.
    """
    try:
        from distill.planning import plan_from_config
    except ImportError:
        log("start-up check skipped: distill.planning is not available in this version of distill.")
        return None
    plan = plan_from_config(
        config,
        _model_source(student),
        _model_source(teacher),
        gpu=profile.gpu,
        num_gpus=profile.num_gpus,
        lora_rank=profile.lora_r,
        qlora=profile.student_quantization == "4bit",
        # The accelerate config, not DistillConfig, says FSDP; and a cached teacher costs the GPU no weights.
        sharding=profile.sharding,
        **({"teacher_mode": "cache"} if profile.teacher_mode == "cache" else {}),
    )
    if not plan.fits:
        raise SystemExit(
            f"Profile {profile.name} does not fit on {profile.num_gpus} x {profile.gpu} with these settings; "
            f"nothing was loaded.\n{plan.message}\nChange the settings (flags or YAML keys) or pick another --profile."
        )
    log(f"start-up check ({profile.num_gpus} x {profile.gpu}): {plan.message}")
    rate = plan.throughput.tokens_per_second
    price = plan.setup.gpu.hourly_usd
    if rate > 0:
        hours = 50e6 / rate / 3600
        cost = f", ${hours * profile.num_gpus * price:,.0f} at ${price:.2f}/GPU-hour"
        log(f"predicted: {rate:,.0f} trained tokens/s; 50M tokens take {hours:.1f} h{cost} (an estimate: MFU assumed)")
    return plan


def _model_source(name: Any) -> Any:
    """What the planner reads a model's shape from: a local folder, a catalogue name, the hub's config.json, or a
    config dict / ``ModelSpec`` (a student that does not exist yet, e.g. a pruned shape)."""
    if not isinstance(name, str):
        return name
    from distill.models.loading import check_model_source
    from distill.planning import model_spec

    try:
        return model_spec(name)
    except KeyError:  # not in the planner's catalogue: its config.json (a few KB) has the shape
        from transformers import AutoConfig

        check_model_source(name)  # a missing local folder is named, not looked up on the hub
        return AutoConfig.from_pretrained(name).to_dict()


# ---- --tiny: models and data built offline ----------------------------------------------------------------


def tiny_models(folder: str | os.PathLike[str]) -> tuple[str, str, Any]:
    """Save a tiny random Qwen2 teacher (4 layers, hidden 128) and student (2 layers, hidden 64) with a tokenizer.

    Both are ``Qwen2ForCausalLM``, the class of the real Qwen2.5 models, and are saved as folders, so the
    recipe loads them exactly as it loads real checkpoints (quantized or not).

    Returns:
        ``(teacher_path, student_path, tokenizer)``.
    """
    from accelerate import PartialState

    from distill.testing import tiny_qwen2, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    paths = [str(Path(folder) / name) for name in ("teacher", "student")]
    state = PartialState()
    # Under `accelerate launch` one process writes the folders and the others wait for it: processes
    # writing the same files at once would let one load a half-written checkpoint.
    with state.main_process_first():
        if state.is_main_process:
            teacher = tiny_qwen2(len(tokenizer), hidden_size=128, num_layers=4, intermediate_size=256, seed=0)
            student = tiny_qwen2(len(tokenizer), hidden_size=64, num_layers=2, intermediate_size=128, seed=1)
            for path, model in zip(paths, (teacher, student), strict=True):
                model.save_pretrained(path)
                tokenizer.save_pretrained(path)
    return paths[0], paths[1], tokenizer


# ---- data -------------------------------------------------------------------------------------------------


def load_rows(source: str, split: str = "train", subset: str | None = None) -> Any:
    """A ``datasets.Dataset`` from a local ``.jsonl``/``.json``/``.parquet`` file or a hub dataset name."""
    import datasets

    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    suffix = Path(source).suffix
    if suffix in kinds:
        if not Path(source).is_file():
            raise SystemExit(f"--dataset {source}: no such file.")
        return datasets.load_dataset(kinds[suffix], data_files=source, split="train")
    return datasets.load_dataset(source, subset, split=split)


def split_heldout(dataset: Any, heldout_rows: int, max_train_rows: int | None, seed: int) -> tuple[Any, Any]:
    """``(train, heldout)``: ``heldout_rows`` rows set aside at random (seeded); train capped at ``max_train_rows``."""
    if heldout_rows >= len(dataset):
        raise SystemExit(f"heldout_rows={heldout_rows} leaves no training rows out of {len(dataset)}.")
    parts = dataset.train_test_split(test_size=heldout_rows, seed=seed, shuffle=True)
    train = parts["train"]
    if max_train_rows is not None and max_train_rows < len(train):
        train = train.select(range(max_train_rows))
    return train, parts["test"]


# ---- models -----------------------------------------------------------------------------------------------


def device_for_this_process() -> str | None:
    """The GPU of this process (``cuda:LOCAL_RANK``), or ``None`` on a CPU (the loaders' default)."""
    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def load_student(path: str, profile: Profile, config: DistillConfig) -> Any:
    """The student: a path left for the Trainer to load (full weights), or a 4-bit model for QLoRA."""
    from distill.models import load_causal_lm

    if profile.student_quantization == "none":
        return path  # the Trainer loads it in config.student_dtype
    return load_causal_lm(
        path,
        dtype=config.student_dtype,  # the 4-bit layers' compute dtype and the dtype of the rest
        quantization=profile.student_quantization,
        device=None if config.use_cpu else device_for_this_process(),
    )


def lora_config(profile: Profile) -> Any:
    """A ``peft.LoraConfig`` on every linear layer, or ``None`` for a full fine-tune."""
    if profile.lora_r is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=profile.lora_r, lora_alpha=2 * profile.lora_r, lora_dropout=0.0, target_modules="all-linear")


def cached_teacher(
    cache_dir: str,
    teacher: str,
    tokenizer: Any,
    rows: Any,
    config: DistillConfig,
    profile: Profile,
    top_k: int = 64,
) -> Any:
    """A ``CachedTeacher`` over ``rows``; the cache is built first (teacher loaded, run once, freed) if missing.

    Only the teacher is on the GPU while the cache is built, and only the student while training: that is
    what lets a 32B teacher and a 14B student share one 24 GB card.
    """
    from distill.cache import build_cache
    from distill.cache.reader import read_manifest
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
            device=None if config.use_cpu else device_for_this_process(),
            progress=not config.disable_tqdm,
        )
        gc.collect()  # the teacher is gone: give its memory back before the student loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return CachedTeacher(cache_dir, tokenizer=tokenizer)


# ---- after training ---------------------------------------------------------------------------------------


def train_student(start: Start, teacher: Any, train: Any, heldout: Any, tokenizer: Any) -> Trainer:
    """Train the profile's student (full, LoRA or QLoRA) from ``teacher`` on ``train``, then save it.

    Resumes from ``config.resume_from_checkpoint`` (a checkpoint folder) when set.
    """
    config, profile = start.config, start.profile
    trainer = Trainer(
        model=load_student(start.student, profile, config),
        teacher=teacher,
        args=config,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora_config(profile),
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    return trainer


def evaluate_and_report(
    trainer: Trainer,
    heldout: Any,
    tokenizer: Any,
    teacher_model: torch.nn.Module | None,
    name: str,
) -> dict[str, Any]:
    """Held-out KD metrics of the trained student, written to ``output_dir/heldout_metrics.json``.

    Always: ``trainer.evaluate()`` on the held-out rows (the Trainer's ``eval_dataset``): KD loss and top-1
    agreement against the same teacher the run trained with (model, shards or cache). With the teacher in
    this process and a single process: also :func:`distill.evaluation.heldout_metrics` (forward KL, top-1
    agreement, both models' cross-entropy) and the report card (``output_dir/report/report.md``).
    """
    metrics: dict[str, Any] = {"trainer_eval": trainer.evaluate()}  # the held-out rows, as prepared
    single = trainer.accelerator.num_processes == 1
    if teacher_model is not None and single:
        from distill.evaluation import ModelResult, heldout_metrics, write_report

        heldout_kd = heldout_metrics(
            trainer.model,
            teacher_model,
            tokenizer,
            heldout,
            max_length=trainer.args.max_length,
            batch_size=trainer.args.per_device_eval_batch_size,
            progress=not trainer.args.disable_tqdm,
        )
        metrics["heldout"] = heldout_kd.as_dict()
        card = write_report(
            Path(trainer.args.output_dir) / "report",
            teacher=ModelResult.from_results("teacher", heldout_kd.teacher_metrics()),
            student=ModelResult.from_results(
                name, heldout_kd.student_metrics(), log_history=trainer.state.log_history
            ),
            title=f"Distillation report card: {name}",
        )
        metrics["headline"] = card.headline
    if trainer.is_world_process_zero():
        path = Path(trainer.args.output_dir) / "heldout_metrics.json"
        path.write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
        shown = {k: v for k, v in metrics.get("heldout", metrics["trainer_eval"]).items() if "runtime" not in k}
        log(f"held-out metrics (all in {path}): {json.dumps(shown, default=float)}")
    return metrics


def teacher_model_of(trainer: Trainer) -> torch.nn.Module | None:
    """The teacher's model when it runs in this process (``None`` for a cached teacher)."""
    return getattr(trainer.teacher, "model", None)

"""What the recipes share, and only that: their command line and profiles, the planner's start-up check, ``--tiny``
models, logging and the end-of-run report.

A recipe (``recipes/*.py``) is a standalone script a user copies and edits, torchtune style: its data, its
student loading, its ``LoraConfig(...)`` and its ``Trainer(...)`` are in the recipe file. It imports this
module from the installed package (no ``sys.path`` edits), so a copied recipe runs anywhere distill is
installed. Nothing here loads a model for training or builds a Trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers.hf_argparser import string_to_bool

from distill import DistillConfig, Trainer
from distill.checks import InputError, arg_bool, check_bool, check_float, check_int
from distill.models.quantization import QUANT_EXTRA_HINT
from distill.planning import Plan, plan_from_config
from distill.planning.report import format_plan

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
    # A frozen LoRA base or QLoRA compute dtype. Full fine-tunes set "float32" in their profile: fp32 master
    # weights under bf16 autocast, since small Adam steps round away on bf16 weights (check_plan warns).
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
    plan: Any  # the planner's Plan

    def plan_summary(self) -> dict[str, Any]:
        """What ``main`` returns for ``--plan_only`` (the table was printed by :func:`begin`)."""
        return {"plan": self.plan.to_dict()}


def begin(
    recipe_type: type,
    profiles: dict[str, Profile],
    argv: Sequence[str] | None,
    base_training: dict[str, Any],
    tiny_recipe: dict[str, Any] | None = None,
) -> Start:
    """Parse (:func:`parse`), log the profile, swap in tiny models with ``--tiny``, and check the plan.

    Before any weight or data is loaded: the planner's check (a profile that does not fit costs seconds;
    with ``--plan_only`` its whole table is printed) and, for a profile that loads 4-bit/8-bit weights,
    that bitsandbytes is installed (:func:`check_quantization_backend`).
    """
    recipe, config, profile = parse(recipe_type, profiles, argv, base_training, tiny_recipe)
    log(f"profile {profile.name}: {profile.description}; output in {config.output_dir}")
    teacher, student = recipe.teacher, recipe.student
    if recipe.tiny:  # tiny random models of the same class (Qwen2), saved as folders
        teacher, student, _ = tiny_models(Path(config.output_dir) / "tiny_models")
    plan = check_plan(config, profile, teacher, student)
    if recipe.plan_only:
        print_plan(plan)
    else:
        check_quantization_backend(config, profile)
    return Start(recipe, config, profile, teacher, student, plan)


def log(message: str) -> None:
    """Print on the main process only (every rank runs the recipe under ``accelerate launch``)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[recipe] {message}", flush=True)


def check_quantization_backend(config: DistillConfig, profile: Profile) -> None:
    """Refuse (exit 2) a run that loads a model in 4-bit/8-bit when bitsandbytes is not installed.

    ``pip install -e .`` does not install it (it is the ``quant`` extra); without this check the recipe
    would fail only when the model loads, after the data (on a rented GPU, minutes and dollars later).
    """
    quantized = {"teacher": config.teacher_quantization, "student": profile.student_quantization}
    needs = [f"the {who} in {mode}" for who, mode in quantized.items() if mode != "none"]
    if needs and find_spec("bitsandbytes") is None:
        refuse(
            f"profile {profile.name} loads {' and '.join(needs)} with bitsandbytes, which is not installed "
            f"(`pip install -e .` leaves it out): {QUANT_EXTRA_HINT}, or `pip install -e '.[quant]'` in a clone."
        )


# ---- the start-up check -----------------------------------------------------------------------------------


def check_plan(config: DistillConfig, profile: Profile, teacher: str, student: Any) -> Plan:
    """Ask the planner (``distill.planning``) whether this run fits the profile's GPUs, before loading weights.

    Raises ``SystemExit`` with the planner's message (what takes the memory, what to change) when the run
    does not fit.

    Returns:
        The planner's ``Plan``.
    """
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
    if plan.setup.training == "full" and plan.setup.precision == "bf16":
        log(
            f"warning: pure bf16 weights at learning rate {config.learning_rate:g}: an Adam step below half a bf16 "
            "ULP of a weight does not move it; --student_dtype float32 keeps fp32 master weights (bf16 autocast)."
        )
    rate = plan.throughput.tokens_per_second
    price = plan.setup.gpu.hourly_usd
    if rate > 0:
        hours = 50e6 / rate / 3600
        cost = f", ${hours * profile.num_gpus * price:,.0f} at ${price:.2f}/GPU-hour"
        log(f"predicted: {rate:,.0f} trained tokens/s; 50M tokens take {hours:.1f} h{cost} (an estimate: MFU assumed)")
    return plan


def print_plan(plan: Plan) -> None:
    """The planner's full table (``distill plan``'s output): memory item by item, peak, speed, cost, advice."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_plan(plan), flush=True)


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


# ---- after training ---------------------------------------------------------------------------------------


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

"""The dependency floors: pyproject.toml's floors are the versions ``make test-min`` installs, and what differs
between the oldest supported transformers (4.57) and 5.x is bridged (``make test-min`` runs the whole fast suite
on the floors; these tests run on any version)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from distill import DistillConfig
from distill.transformers_compat import move_warmup_fraction

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of the ``name==version`` lines of a pip constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def test_pyproject_floors_are_the_versions_test_min_installs() -> None:
    # pyproject's [project] dependencies list, read as text (tomllib is 3.11+; we support 3.10).
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block, "pyproject.toml has no dependencies list"
    dependencies = re.findall(r'^\s*"([^"]+)",?\s*$', block[1], re.M)
    assert dependencies
    floors = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: every dependency has a tested floor, written name>=version"
        floors[match[1].lower()] = match[2]
    pins = _pins(ROOT / "requirements" / "min.txt")
    assert set(pins) == set(floors), (pins, floors)
    for name, floor in floors.items():
        # The floor is the release tested, not a lower one next to it ("2.13" == "2.13.0", "4.57" != "4.57.6").
        assert Version(pins[name]) == Version(floor), (name, floor, pins[name])


@pytest.mark.parametrize(
    ("given", "ratio", "steps"),
    [(0.03, 0.03, 0), (0.5, 0.5, 0), (10.0, 0.0, 10), (0, 0.0, 0), (7, 0.0, 7)],
)
def test_a_fractional_warmup_moves_to_warmup_ratio_on_transformers_4(given: float, ratio: float, steps: int) -> None:
    # transformers 4.x's TrainingArguments (it has warmup_ratio; warmup_steps must be an int there).
    args = SimpleNamespace(warmup_ratio=0.0, warmup_steps=given)
    move_warmup_fraction(args)
    assert (args.warmup_ratio, args.warmup_steps) == (ratio, steps)
    assert isinstance(args.warmup_steps, int)


def test_a_fractional_warmup_is_left_alone_on_transformers_5() -> None:
    args = SimpleNamespace(warmup_steps=0.03)  # 5.x has no warmup_ratio: warmup_steps < 1 is the fraction
    move_warmup_fraction(args)
    assert args.warmup_steps == 0.03 and not hasattr(args, "warmup_ratio")


@pytest.mark.parametrize(("flag", "expected"), [("0.03", 3), ("0.25", 25), ("10", 10)])
def test_a_warmup_fraction_on_the_command_line_parses_on_the_installed_transformers(
    tmp_path: Path, flag: str, expected: int
) -> None:
    # transformers 4.57 types warmup_steps as an int: "--warmup_steps 0.03" was refused by its own argparse.
    from transformers import HfArgumentParser

    argv = ["--output_dir", str(tmp_path), "--warmup_steps", flag, "--use_cpu", "--report_to", "none"]
    (args,) = HfArgumentParser(DistillConfig).parse_args_into_dataclasses(argv)
    assert args.get_warmup_steps(100) == expected


@pytest.mark.parametrize(("warmup", "expected"), [(0.25, 25), (10, 10), (0, 0)])
def test_warmup_steps_means_the_same_on_the_installed_transformers(tmp_path: Path, warmup: float, expected: int):
    args = DistillConfig(output_dir=str(tmp_path), warmup_steps=warmup, use_cpu=True, report_to="none")
    assert args.get_warmup_steps(100) == expected


def test_a_bf16_config_built_earlier_does_not_make_a_later_fp32_run_bf16(tmp_path: Path, tokenizer) -> None:
    # transformers 4.57 passes mixed precision to the Accelerator through an environment variable that any bf16
    # arguments set and nothing resets: without transformers_compat.point_mixed_precision_at this run trained in bf16.
    from trainer_helpers import arithmetic_dataset, config

    from distill import Trainer
    from distill.testing import tiny_teacher_student

    DistillConfig(output_dir=str(tmp_path / "plan"), bf16=True, use_cpu=True, report_to="none")  # e.g. --plan_only
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    fp32 = Trainer(student, teacher, config(tmp_path / "fp32", max_steps=1), arithmetic_dataset(4),
                   processing_class=tokenizer)  # fmt: skip
    assert fp32.accelerator.mixed_precision == "no"
    ids = torch.randint(0, len(tokenizer), (1, 9))
    with torch.no_grad():  # the prepared student's forward is not wrapped in a bf16 autocast either
        expected = student(input_ids=ids).logits
        torch.testing.assert_close(fp32.accelerator.prepare_model(student)(input_ids=ids).logits, expected)
    bf16 = Trainer(student, teacher, config(tmp_path / "bf16", max_steps=1, bf16=True), arithmetic_dataset(4),
                   processing_class=tokenizer)  # fmt: skip
    assert bf16.accelerator.mixed_precision == "bf16"  # and a bf16 run still gets it


def test_gradient_checkpointing_is_non_reentrant_on_every_version(tmp_path: Path, tokenizer) -> None:
    # Reentrant checkpointing (transformers 4.x's default) breaks DDP + LoRA; the trainer re-enables checkpointing
    # with the arguments' kwargs when training starts, so check the layers after a step.
    from peft import LoraConfig
    from trainer_helpers import arithmetic_dataset, config

    from distill import Trainer
    from distill.testing import tiny_teacher_student

    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = config(tmp_path, max_steps=1, gradient_checkpointing=True)
    trainer = Trainer(student, teacher, args, arithmetic_dataset(4), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    settings = [
        module._gradient_checkpointing_func.keywords.get("use_reentrant")
        for module in trainer.model.modules()
        if hasattr(getattr(module, "_gradient_checkpointing_func", None), "keywords")
    ]
    assert settings and all(value is False for value in settings), settings

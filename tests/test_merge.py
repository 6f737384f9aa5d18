"""merge_adapters / distill merge: a LoRA student becomes a standard model folder; save_model says how to load it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill
from distill.checks import InputError
from distill.models import merge_adapters
from distill.models.merge import ADAPTER_CONFIG, load_snippet

SRC = str(Path(distill.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def lora_student(tmp_path: Path, tokenizer, tiny_pair):
    """A tiny student saved as a base folder plus a folder of non-zero LoRA adapters (as a LoRA run saves them)."""
    _, student = tiny_pair
    base = tmp_path / "base"
    student.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)  # so the adapters record the base folder
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    adapters = tmp_path / "adapters"
    peft_model.save_pretrained(adapters)
    tokenizer.save_pretrained(adapters)
    return peft_model.eval(), base, adapters


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_folder_is_a_plain_model_with_the_adapted_outputs(tmp_path: Path, lora_student) -> None:
    peft_model, base, adapters = lora_student
    ids = torch.randint(0, 256, (2, 12))
    expected = _logits(peft_model, ids)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(base), ids))  # adapters matter

    out = merge_adapters(adapters, tmp_path / "merged")
    assert (out / "config.json").is_file() and not (out / ADAPTER_CONFIG).exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not getattr(merged, "peft_config", None)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(adapters).get_vocab()


def test_an_in_memory_peft_model_merges_too(tmp_path: Path, tokenizer, lora_student) -> None:
    peft_model, _, _ = lora_student
    ids = torch.randint(0, 256, (1, 9))
    expected = _logits(peft_model, ids)
    out = merge_adapters(peft_model, tmp_path / "merged", tokenizer=tokenizer)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), expected)


def test_refusals_name_the_fix(tmp_path: Path, lora_student) -> None:
    peft_model, base, adapters = lora_student
    with pytest.raises(InputError, match="no adapters to merge"):
        merge_adapters(base, tmp_path / "a")
    with pytest.raises(InputError, match="not empty"):
        merge_adapters(adapters, base)
    with pytest.raises(InputError, match="no peft adapters"):
        merge_adapters(peft_model.get_base_model(), tmp_path / "b")
    config = json.loads((adapters / ADAPTER_CONFIG).read_text())
    (adapters / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(InputError, match="--base"):
        merge_adapters(adapters, tmp_path / "c")
    assert (merge_adapters(adapters, tmp_path / "d", base=base) / "config.json").is_file()


def test_distill_merge_command(tmp_path: Path, lora_student) -> None:
    _, _, adapters = lora_student
    run = [sys.executable, "-m", "distill.cli", "merge"]
    done = subprocess.run([*run, str(adapters), "--out", str(tmp_path / "m")], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"Merged model and tokenizer in {(tmp_path / 'm').resolve()}" in done.stdout
    assert "AutoModelForCausalLM.from_pretrained(" in done.stdout
    missing = subprocess.run(
        [*run, str(tmp_path / "nope"), "--out", str(tmp_path / "n")], env=ENV, capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no model folder" in missing.stderr


def test_save_model_prints_where_the_student_is_and_a_snippet_that_loads_it(
    tmp_path: Path, tokenizer, tiny_pair, capsys
):
    from trainer_helpers import arithmetic_dataset, config

    from distill import Trainer

    teacher, student = tiny_pair
    student.save_pretrained(tmp_path / "base")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # a student given by folder, as users do
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = config(tmp_path / "run", max_steps=1)
    trainer = Trainer(student, teacher, args, arithmetic_dataset(4), processing_class=tokenizer, peft_config=lora)
    trainer.train()
    saved = tmp_path / "student"
    trainer.save_model(str(saved))
    out = capsys.readouterr().out
    snippet = load_snippet(saved)
    assert f"The student (LoRA adapters and tokenizer) is in {saved.resolve()}. Load it with:\n{snippet}" in out
    assert len(snippet.splitlines()) == 3 and "distill merge" in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # the printed lines load the adapters on their base, and the tokenizer
    ids = torch.randint(0, 256, (1, 7))
    trainer.model.eval()
    torch.testing.assert_close(_logits(namespace["model"], ids), _logits(trainer.model, ids))
    assert namespace["tokenizer"].get_vocab() == tokenizer.get_vocab()

"""Structured pruning (distill.pruning): exact identity, standard models at every shape, importance, refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen3Config

from distill.pruning import (
    PruneShape,
    UnsupportedArchitectureError,
    calibration_batches,
    check_shape,
    count_parameters,
    measure_importance,
    prune,
    prune_to_shape,
    shape_of,
)
from distill.testing import arithmetic_rows, tiny_llama, tiny_qwen2


def _qwen3(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


MODELS = {
    "llama": lambda v: tiny_llama(v, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96),
    "llama-tied": lambda v: tiny_llama(
        v, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=3, tie_word_embeddings=True
    ),
    "qwen2-bias": lambda v: tiny_qwen2(v, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2),
    "qwen3": _qwen3,
}


@pytest.fixture
def rows() -> list[dict[str, object]]:
    return arithmetic_rows(24, layout="messages")


def _batches(rows, tokenizer):  # noqa: ANN001, ANN202
    return calibration_batches(rows, tokenizer, max_length=64, batch_size=8)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pruning_nothing_reproduces_the_teacher_exactly(kind, tokenizer, rows) -> None:  # noqa: ANN001
    teacher = MODELS[kind](len(tokenizer)).eval()
    batches = _batches(rows, tokenizer)
    importance = measure_importance(teacher, batches, progress=False)
    pruned = prune_to_shape(teacher, importance, shape_of(teacher.config))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(pruned.model.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert pruned.record["hidden_channels"] is None
    assert pruned.model.config.distill_pruning["layers"] == list(range(teacher.config.num_hidden_layers))


SHAPES = [
    dict(intermediate_size=40),
    dict(num_attention_heads=2),  # one query head per KV group
    dict(num_attention_heads=2, num_key_value_heads=1),
    dict(hidden_size=48),
    dict(num_layers=2),
    dict(num_layers=1, hidden_size=48, num_attention_heads=2, num_key_value_heads=1, intermediate_size=17),
]


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("cut", SHAPES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_pruned_shape_is_a_standard_model(kind, cut, tokenizer, rows, tmp_path) -> None:  # noqa: ANN001
    teacher = MODELS[kind](len(tokenizer)).eval()
    shape = dataclasses.replace(shape_of(teacher.config), **cut)
    try:
        check_shape(shape_of(teacher.config), shape, teacher.config)
    except ValueError as error:  # e.g. 2 query heads over 3 KV groups: refused before any work
        with pytest.raises(ValueError, match=re.escape(str(error))):
            prune(teacher, [], shape, progress=False)
        return
    result = prune(teacher, _batches(rows, tokenizer), shape, progress=False)
    model = result.pruned.model
    assert shape_of(model.config) == shape
    assert sum(p.numel() for p in model.parameters()) == count_parameters(teacher.config, shape)["total"]
    result.save(tmp_path, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(teacher)
    assert loaded.config.distill_pruning == model.config.distill_pruning
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 5)
    saved = json.loads((tmp_path / "pruning.json").read_text())
    assert len(saved["record"]["layers"]) == shape.num_layers
    assert all(len(n) == shape.intermediate_size for n in saved["record"]["neurons"])


def test_importance_is_deterministic_and_ignores_padding(tokenizer, rows) -> None:  # noqa: ANN001
    teacher = MODELS["llama"](len(tokenizer)).eval()
    batches = _batches(rows, tokenizer)
    first = measure_importance(teacher, batches, progress=False, skip_loss_batches=1)
    second = measure_importance(teacher, batches, progress=False, skip_loss_batches=1)
    for name in ("neurons", "heads", "channels", "block_distance", "block_skip_loss"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.tokens == int(sum(b["attention_mask"].sum() for b in batches))
    # Each row alone (no padding) gives the same statistics as the padded batches, up to summation order.
    single = [calibration_batches([row], tokenizer, max_length=64, batch_size=1)[0] for row in rows]
    alone = measure_importance(teacher, single, progress=False)
    assert alone.tokens == first.tokens
    torch.testing.assert_close(alone.neurons, first.neurons, rtol=1e-4, atol=1e-9)
    assert (first.block_skip_loss > 0).all() and (first.block_distance > 0).all()


def test_least_squares_refit_lowers_the_error_of_each_pruned_map(tokenizer, rows) -> None:  # noqa: ANN001
    teacher = MODELS["llama"](len(tokenizer)).eval()
    batches = _batches(rows, tokenizer)
    importance = measure_importance(teacher, batches, progress=False)
    shape = dataclasses.replace(shape_of(teacher.config), intermediate_size=24)
    sliced = prune_to_shape(teacher, importance, shape, refit=False).model.eval()
    refitted = prune_to_shape(teacher, importance, shape, refit=True).model.eval()
    errors = {}
    for name, model in (("sliced", sliced), ("refit", refitted)):
        caught: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = teacher.model.layers[0].mlp.register_forward_hook(lambda _m, a, o: caught.append((a[0], o)))  # noqa: B023
        with torch.no_grad():
            teacher(**{k: batches[0][k] for k in ("input_ids", "attention_mask")})
            student_out = model.model.layers[0].mlp(caught[0][0])  # the teacher's MLP input to both MLPs
        hook.remove()
        errors[name] = float((student_out - caught[0][1]).square().mean())
    assert errors["refit"] < 0.9 * errors["sliced"]


def test_budget_search_fits_the_budget_and_says_why(tokenizer, rows) -> None:  # noqa: ANN001
    teacher = tiny_llama(len(tokenizer), hidden_size=96, num_layers=10, num_heads=6, num_kv_heads=3).eval()
    result = prune(teacher, _batches(rows, tokenizer), 0.5, progress=False)
    budget = 0.5 * count_parameters(teacher.config)["non_embedding"]
    assert len(result.candidates) > 2
    assert all(c.parameters <= budget for c in result.candidates)
    assert result.student_parameters["non_embedding"] <= budget
    losses = [c.calibration_loss for c in result.candidates]
    assert losses == sorted(losses) and result.student_loss == losses[0]
    assert "lowest calibration loss" in result.reason and str(result.pruned.shape) in result.reason
    assert "candidate shape" in result.table()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (dict(num_attention_heads=3), "multiple of num_key_value_heads"),
        (dict(num_attention_heads=8), r"in \[1, 4\]"),
        (dict(hidden_size=0), r"in \[1, 64\]"),
        (dict(intermediate=3), "Unknown shape fields"),
        (0.0, "fraction in"),
        (float("nan"), "fraction in"),
        (-3, "fraction in"),
        (1e12, "fraction in"),
        (0.001, "No shape fits"),
        ("half", "target must be"),
    ],
)
def test_bad_targets_are_refused_before_any_work(target, message, tokenizer, rows, monkeypatch) -> None:  # noqa: ANN001
    import distill.pruning.search as search

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibration ran before the target was checked")

    monkeypatch.setattr(search, "measure_importance", no_work)
    teacher = MODELS["llama"](len(tokenizer))
    with pytest.raises((ValueError, TypeError), match=message):
        prune(teacher, [], target, progress=False)


def test_unsupported_architectures_are_refused(tokenizer) -> None:  # noqa: ANN001
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="Llama-family"):
        prune(gpt2, [], 0.5, progress=False)
    with pytest.raises(ValueError, match="head_dim is not pruned"):
        teacher = MODELS["llama"](len(tokenizer))
        prune(teacher, [], dataclasses.replace(shape_of(teacher.config), head_dim=8), progress=False)


def test_shape_is_a_plain_record() -> None:
    shape = PruneShape(2, 64, 4, 2, 96, 16)
    assert str(shape) == "2 layers, hidden 64, heads 4/2 kv, MLP 96"
    assert shape.as_dict()["intermediate_size"] == 96


def test_prune_cli(tokenizer, rows, tmp_path, capsys) -> None:  # noqa: ANN001
    import datasets

    from distill.cli import main

    teacher = MODELS["llama"](len(tokenizer))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    datasets.Dataset.from_list(rows).to_json(tmp_path / "rows.jsonl")
    out = tmp_path / "student"
    args = ["prune", "--model", str(tmp_path / "teacher"), "--dataset", str(tmp_path / "rows.jsonl"),
            "--out", str(out), "--max-length", "64", "--no-progress"]  # fmt: skip
    assert main([*args, "--target", "layers=2,mlp=48"]) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "Explicit shape: 2 layers" in printed
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 48
    bad_cases = {
        "--target layers=two": "not an integer",
        "--target depth=3": "unknown shape field",
        "--target -1": "positive",
        "--target 0.5 --batch-size 0": "--batch-size",
        "--target 0.5 --dtype float8": "dtype",
        "--target heads=3": "multiple of num_key_value_heads",
        "--target 0.001": "No shape fits",
    }
    for bad, message in bad_cases.items():
        other = ["--out", str(tmp_path / "other")]
        with pytest.raises(SystemExit) if "--batch-size" in bad or "--dtype" in bad else contextlib.nullcontext():
            assert main([*args[:-3], *other, *bad.split()]) == 2
        assert message in capsys.readouterr().err
    assert main([*args, "--target", "0.5"]) == 2  # --out is the student written above
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_statistics_that_do_not_fit_are_collected_in_more_passes(tokenizer, rows) -> None:  # noqa: ANN001
    teacher = MODELS["qwen2-bias"](len(tokenizer)).eval()
    batches = _batches(rows, tokenizer)
    one_pass = measure_importance(teacher, batches, progress=False)
    per_layer = measure_importance(teacher, batches, progress=False, max_gram_bytes=1)  # one layer per pass
    assert set(one_pass.moments) == set(per_layer.moments)
    for name, site in one_pass.moments.items():
        other = per_layer.moments[name]
        assert other.tokens == site.tokens, name
        if site.gram is not None:
            torch.testing.assert_close(other.gram, site.gram, rtol=1e-5, atol=1e-6)
    assert torch.equal(per_layer.neurons, one_pass.neurons)
    shape = dataclasses.replace(shape_of(teacher.config), intermediate_size=40, hidden_size=48)
    a = prune_to_shape(teacher, one_pass, shape).model
    b = prune_to_shape(teacher, per_layer, shape).model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_pruning_cost_counts_the_statistics() -> None:
    from distill.planning import model_spec, pruning_cost

    spec = model_spec("HuggingFaceTB/SmolLM2-135M")
    cost = pruning_cost(spec, calibration_tokens=8192, batch_tokens=2048, dtype_bytes=4)
    assert cost.gram_bytes == 30 * (1536**2 + 2 * 576**2 + 576**2) * 4  # down, attention and MLP inputs, o
    assert cost.teacher_bytes == spec.num_params * 4
    without = pruning_cost(spec, calibration_tokens=8192, batch_tokens=2048, refit=False)
    assert without.gram_bytes < cost.gram_bytes / 100

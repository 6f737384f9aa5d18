"""Intermediate-layer (hidden-state) distillation: the loss, the layer map, the projections, the trainer path."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from reference import Rng, assert_close, fresh_seed, hidden_loss_ref, leaves64
from trainer_helpers import arithmetic_dataset, config, first_last_mean, logged, pruned_student, state_vector
from transformers import AutoModelForCausalLM, TrainerCallback

from distill import Trainer
from distill.config import parse_layer_map
from distill.losses import hidden_state_loss
from distill.models import student_from_teacher
from distill.teachers import DataTeacher, ModelTeacher, ServerTeacher, catch_layer_outputs
from distill.testing import tiny_llama, tiny_teacher_student
from distill.trainer.batching import next_token_labels
from distill.trainer.hidden import PROJECTIONS_FILE, evenly_spaced_map

TOL = 1e-5
SHAPES = [(3, 47, 31), (1, 1, 8), (2, 17, 160)]


# ---- the loss against the float64 reference ------------------------------------------------------


def _draw_states(rng: Rng, shape, layers: int):
    students = [rng.randn(*shape).requires_grad_(True) for _ in range(layers)]
    # Teachers correlated with the students (a partly trained student), at a different scale per layer.
    teachers = [
        (s.detach() * rng.py.uniform(0.5, 3.0) + rng.randn(*shape, scale=rng.py.uniform(0.3, 2.0))) for s in students
    ]
    return students, teachers


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_hidden_loss_matches_reference(kind, shape) -> None:
    rng = Rng(fresh_seed())
    layers = rng.choice([1, 2, 3])
    students, teachers = _draw_states(rng, shape, layers)
    mask = torch.rand(shape[:-1], generator=rng.torch) < 0.7
    mask.view(-1)[rng.py.randrange(mask.numel())] = True
    weights = rng.choice([None, [rng.py.uniform(0.1, 2.0) for _ in range(layers)]])
    out = hidden_state_loss(students, teachers, mask, kind=kind, layer_weights=weights)
    students64 = leaves64(*students)
    ref = hidden_loss_ref(students64, teachers, mask, kind, weights)
    # 1 - cos near 0 (a teacher close to its student) is computed from terms of size 1 per token: float32 rounds
    # those, so the cosine loss and its gradient are compared at the size of their terms (see rel_err).
    cosine = kind == "cosine"
    loss_floor, grad_floor = _cosine_floors(students, weights, mask) if cosine else (0.0, [0.0] * layers)
    assert_close(out.loss, ref, TOL, "loss", floor=loss_floor)
    assert out.num_tokens == int(mask.sum())
    for index in range(layers):
        layer_ref = hidden_loss_ref([students64[index]], [teachers[index]], mask, kind)
        assert_close(out.layer_losses[index], layer_ref, TOL, f"layer {index}", floor=1.0 if cosine else 0.0)
    out.loss.backward()
    ref.backward()
    for index in range(layers):
        assert_close(students[index].grad, students64[index].grad, TOL, f"grad of layer {index}", grad_floor[index])


def _cosine_floors(students, weights, mask) -> tuple[float, list[float]]:
    """The size of the terms the cosine loss and each layer's gradient are computed from.

    The loss is a weighted mean of ``1 - cos`` (terms of size 1); the gradient at a token is a difference of two
    unit directions over ``|s| * tokens``, times the layer's share ``w_l / sum w`` of the loss.
    """
    weights = weights or [1.0] * len(students)
    tokens = max(int(mask.sum()), 1)
    return 1.0, [
        w / sum(weights) * float((1.0 / s.detach().double().norm(dim=-1)[mask]).max()) / tokens
        for w, s in zip(weights, students, strict=True)
    ]


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_loss_all_masked_is_zero_with_zero_grads(kind) -> None:
    rng = Rng(fresh_seed())
    students, teachers = _draw_states(rng, (2, 5, 7), 2)
    out = hidden_state_loss(students, teachers, torch.zeros(2, 5, dtype=torch.bool), kind=kind)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and out.num_tokens == 0
    assert all(float(s.grad.abs().max()) == 0.0 for s in students)


def test_relative_mse_means_the_same_at_any_scale_and_width() -> None:
    """Scaling a layer's states, or repeating its channels (a wider copy), leaves the relative MSE unchanged."""
    rng = Rng(fresh_seed())
    (student,), (teacher,) = _draw_states(rng, (2, 9, 16), 1)
    base = float(hidden_state_loss([student], [teacher], kind="mse").loss)
    scaled = float(hidden_state_loss([student * 37.0], [teacher * 37.0], kind="mse").loss)
    wide = float(hidden_state_loss([student.repeat(1, 1, 4)], [teacher.repeat(1, 1, 4)], kind="mse").loss)
    assert math.isclose(base, scaled, rel_tol=1e-5) and math.isclose(base, wide, rel_tol=1e-5)
    # Predicting zeros scores 1, whatever the teacher.
    assert math.isclose(float(hidden_state_loss([teacher * 0], [teacher], kind="mse").loss), 1.0, rel_tol=1e-6)


def test_hidden_loss_refuses_bad_inputs() -> None:
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="differ"):
        hidden_state_loss([s], [torch.randn(2, 3, 5)])
    with pytest.raises(ValueError, match="Unknown hidden-state loss"):
        hidden_state_loss([s], [t], kind="l1")
    with pytest.raises(ValueError, match="layer_weights"):
        hidden_state_loss([s], [t], layer_weights=[-1.0])
    with pytest.raises(ValueError, match="one teacher state per student state"):
        hidden_state_loss([s, s], [t])


# ---- which states: the residual stream after each layer ------------------------------------------


def test_caught_layer_outputs_are_the_residual_stream(tokenizer) -> None:
    """Layer i's output is hidden_states[i + 1]; the last layer's is the final norm's *input*, not its output."""
    model = tiny_llama(len(tokenizer), num_layers=3).eval()
    ids = torch.randint(0, len(tokenizer), (2, 11))
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers adds its own recording hooks on first use
    hooks_before = [len(layer._forward_hooks) for layer in model.model.layers]
    with torch.no_grad(), catch_layer_outputs(model, (0, 1, 2)) as caught:
        out = model(input_ids=ids, output_hidden_states=True)
    assert sorted(caught) == [0, 1, 2]
    for layer in (0, 1):
        assert torch.equal(caught[layer], out.hidden_states[layer + 1])
    assert torch.allclose(model.model.norm(caught[2]), out.hidden_states[-1], atol=1e-6)
    assert not torch.allclose(caught[2], out.hidden_states[-1], atol=1e-3)
    # The hooks are gone after the block.
    with torch.no_grad():
        model(input_ids=ids)
    assert [len(layer._forward_hooks) for layer in model.model.layers] == hooks_before


def test_layer_maps() -> None:
    assert evenly_spaced_map(2, 4) == [(0, 1), (1, 3)]
    assert evenly_spaced_map(3, 30) == [(0, 9), (1, 19), (2, 29)]
    assert evenly_spaced_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert parse_layer_map("0:1, 1:3") == [(0, 1), (1, 3)]
    assert parse_layer_map(["0:1", (1, 3)]) == [(0, 1), (1, 3)]
    cfg = config("/tmp/unused", hidden_loss_weight=1.0, hidden_layer_map=[(0, 1), (1, 3)])
    assert cfg.hidden_layer_map == "0:1,1:3"  # canonical, JSON / CLI friendly


# ---- the trainer path ----------------------------------------------------------------------------


def _trainer(tmp_path: Path, tokenizer, pair, **overrides) -> Trainer:
    teacher, student = pair
    overrides.setdefault("hidden_loss_weight", 1.0)
    return Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path / "out", **overrides),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
    )


def _first_batch(trainer: Trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _one_step_metrics(trainer: Trainer, inputs: dict) -> dict[str, float]:
    """The train metrics of one no-grad loss computation on ``inputs``."""
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    return trainer._train_metrics.pop()


def _record(teacher, layers, channels=None) -> dict:
    return {
        "teacher_num_hidden_layers": teacher.config.num_hidden_layers,
        "teacher_hidden_size": teacher.config.hidden_size,
        "layers": list(layers),
        "hidden_channels": channels,
    }


def test_auto_map_follows_the_pruning_record(tmp_path, tokenizer, taught_pair) -> None:
    """A depth-pruned copy (teacher layers 0 and 2): student layer 0 IS teacher layer 0, so its loss is 0."""
    teacher, _ = taught_pair
    student = student_from_teacher(teacher, [0, 2])
    student.config.distill_pruning = _record(teacher, [0, 2])
    trainer = _trainer(tmp_path, tokenizer, (teacher, student), hidden_loss="mse")
    assert trainer.hidden.pairs == [(0, 0), (1, 2)] and trainer.hidden.mode == "identity"
    assert trainer.hidden.projections is None
    logs = _one_step_metrics(trainer, _first_batch(trainer))
    assert logs["hidden_loss/layer_0"] < 1e-10
    assert logs["hidden_loss/layer_1"] > 1e-3  # its input skipped teacher layer 1
    assert math.isclose(logs["hidden_loss"], (logs["hidden_loss/layer_0"] + logs["hidden_loss/layer_1"]) / 2)
    # Without the record, the map is evenly spaced (the last layer meets the last).
    del student.config.distill_pruning
    trainer = _trainer(tmp_path, tokenizer, (teacher, student))
    assert trainer.hidden.pairs == [(0, 1), (1, 3)]
    # The record survives save / load (a plain dict in config.json).
    student.config.distill_pruning = _record(teacher, [0, 2])
    student.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["distill_pruning"]["layers"] == [0, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert _trainer(tmp_path, tokenizer, (teacher, reloaded)).hidden.pairs == [(0, 0), (1, 2)]


_WIDTH_SLICES = {  # parameter name suffix -> which dimension holds the hidden channels
    "embed_tokens.weight": 1,
    "lm_head.weight": 1,
    "q_proj.weight": 1,
    "k_proj.weight": 1,
    "v_proj.weight": 1,
    "gate_proj.weight": 1,
    "up_proj.weight": 1,
    "o_proj.weight": 0,
    "down_proj.weight": 0,
    "norm.weight": 0,
    "layernorm.weight": 0,
}


def _width_pruned(teacher, keep: list[int], zero_dropped: bool):
    """``(teacher, student)``: the student keeps the teacher's hidden channels ``keep`` (sliced weights).

    With ``zero_dropped`` the teacher's dropped channels are made exactly 0 in its residual stream
    (zero embedding columns and zero rows of every write into it), and the student's norm weights are
    rescaled for the RMS over fewer channels: the student then computes exactly the teacher's kept channels.
    """
    teacher = copy.deepcopy(teacher)
    width = teacher.config.hidden_size
    drop = [c for c in range(width) if c not in keep]
    if zero_dropped:
        with torch.no_grad():
            teacher.model.embed_tokens.weight[:, drop] = 0
            for layer in teacher.model.layers:
                layer.self_attn.o_proj.weight[drop, :] = 0
                layer.mlp.down_proj.weight[drop, :] = 0
    student_config = copy.deepcopy(teacher.config)
    student_config.hidden_size = len(keep)
    student_config.head_dim = teacher.config.hidden_size // teacher.config.num_attention_heads
    student = AutoModelForCausalLM.from_config(student_config, attn_implementation="sdpa")
    index = torch.tensor(keep)
    state = {}
    for name, value in teacher.state_dict().items():
        dim = next(d for suffix, d in _WIDTH_SLICES.items() if name.endswith(suffix))
        state[name] = value.index_select(dim, index)
        if name.endswith("norm.weight"):
            state[name] = state[name] * math.sqrt(width / len(keep))
    student.load_state_dict(state)
    student.config.distill_pruning = _record(teacher, range(teacher.config.num_hidden_layers), keep)
    return teacher, student


def _keep(width: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(width, generator=generator)[: width * 3 // 4].tolist())


def test_width_pruned_student_is_matched_by_exact_selection(tmp_path, tokenizer, taught_pair, seed) -> None:
    """When the student computes exactly the teacher's kept channels, the selected hidden loss is 0 at every layer."""
    base, _ = taught_pair
    for module in base.modules():  # a tiny epsilon: the rescaled norms then match to float32 rounding
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    base.config.rms_norm_eps = 1e-12
    keep = _keep(base.config.hidden_size, seed)
    teacher, student = _width_pruned(base, keep, zero_dropped=True)
    trainer = _trainer(tmp_path, tokenizer, (teacher, student), hidden_loss="mse")
    assert trainer.hidden.mode == "select" and trainer.hidden.projections is None
    assert trainer.hidden.channels.tolist() == keep
    logs = _one_step_metrics(trainer, _first_batch(trainer))
    for layer in range(teacher.config.num_hidden_layers):
        assert logs[f"hidden_loss/layer_{layer}"] < 1e-9, logs
    assert logs["kd_loss"] < 1e-6  # the same model, so the same logits
    # The same student compared with the teacher's *first* channels instead is far off.
    student.config.distill_pruning["hidden_channels"] = list(range(len(keep)))
    wrong = _trainer(tmp_path, tokenizer, (teacher, student), hidden_loss="mse")
    assert _one_step_metrics(wrong, _first_batch(wrong))["hidden_loss"] > 0.1


def test_selection_equals_a_manual_computation(tmp_path, tokenizer, taught_pair, seed) -> None:
    """On an ordinary teacher: the trainer's hidden loss is the reference over teacher_h[..., channels]."""
    base, _ = taught_pair
    keep = _keep(base.config.hidden_size, seed)
    teacher, student = _width_pruned(base, keep, zero_dropped=False)
    trainer = _trainer(tmp_path, tokenizer, (teacher, student), hidden_loss="mse", hidden_layer_map="0:0,1:2,2:1")
    inputs = _first_batch(trainer)
    logs = _one_step_metrics(trainer, inputs)
    with torch.no_grad():
        kwargs = dict(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True
        )
        student_states = student(**kwargs).hidden_states
        teacher_states = teacher(**kwargs).hidden_states
    mask = next_token_labels(inputs["labels"]) != -100
    pairs = [(0, 0), (1, 2), (2, 1)]
    students = [student_states[s + 1] for s, _ in pairs]
    teachers = [teacher_states[t + 1][..., keep] for _, t in pairs]
    reference = hidden_loss_ref(students, teachers, mask, "mse")
    assert math.isclose(logs["hidden_loss"], float(reference), rel_tol=1e-5)
    for (s, _), student_layer, teacher_layer in zip(pairs, students, teachers, strict=True):
        layer_ref = float(hidden_loss_ref([student_layer], [teacher_layer], mask, "mse"))
        assert math.isclose(logs[f"hidden_loss/layer_{s}"], layer_ref, rel_tol=1e-5)


def test_dense_and_fused_paths_and_checkpointing_agree(tmp_path, tokenizer, taught_pair) -> None:
    """Same hidden loss and student gradients through the dense path and under gradient checkpointing."""
    teacher, student = taught_pair
    results = []
    for implementation, checkpointing in (("fused", False), ("dense", False), ("fused", True)):
        trainer = _trainer(
            tmp_path, tokenizer, (teacher, copy.deepcopy(student)), loss_implementation=implementation, kd_weight=1.0
        )
        if checkpointing:
            trainer.model.gradient_checkpointing_enable()
        trainer.model.train()
        inputs = _first_batch(trainer)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        results.append((trainer._train_metrics.pop()["hidden_loss"], grads))
    for hidden_loss, grads in results[1:]:
        assert math.isclose(hidden_loss, results[0][0], rel_tol=1e-5)
        assert torch.allclose(grads, results[0][1], atol=1e-6, rtol=1e-4)


def test_learned_projections_train_and_are_not_saved(tmp_path, tokenizer, taught_pair) -> None:
    teacher, student = taught_pair  # widths 128 and 64, no record: a learned map per student layer
    trainer = _trainer(tmp_path, tokenizer, (teacher, student), max_steps=4)
    hidden = trainer.hidden
    assert hidden.mode == "learned" and len(hidden.projections) == 2
    assert tuple(hidden.projections[0].weight.shape) == (128, 64)
    before = [p.detach().clone() for p in hidden.projections.parameters()]
    trainer.train()
    grouped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in grouped for p in hidden.projections.parameters())
    for old, new in zip(before, hidden.projections.parameters(), strict=True):
        assert not torch.equal(old, new)
    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert set(saved) == set(student.state_dict()) - {"lm_head.weight"} or set(saved) == set(student.state_dict())
    assert "distill" not in (tmp_path / "student" / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # a standard model, nothing extra


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_kd_learns(tmp_path, tokenizer, taught_pair, kind) -> None:
    """Both losses go down with the hidden-state term on (and the run with it off is there to compare)."""
    teacher, student = taught_pair
    runs = {}
    for weight in (0.0, 1.0):
        trainer = _trainer(
            tmp_path / str(weight), tokenizer, (teacher, copy.deepcopy(student)),
            hidden_loss=kind, hidden_loss_weight=weight, max_steps=24, learning_rate=3e-3, logging_steps=2,
        )  # fmt: skip
        trainer.train()
        runs[weight] = trainer
    on = runs[1.0]
    hidden_first, hidden_last = first_last_mean(logged(on, "hidden_loss"))
    kd_first, kd_last = first_last_mean(logged(on, "kd_loss"))
    assert hidden_last < 0.8 * hidden_first, logged(on, "hidden_loss")
    assert kd_last < 0.95 * kd_first, logged(on, "kd_loss")
    assert not logged(runs[0.0], "hidden_loss")  # off: nothing computed, nothing logged
    off_first, off_last = first_last_mean(logged(runs[0.0], "kd_loss"))
    print(f"{kind}: kd {kd_first:.3f} -> {kd_last:.3f} with hidden loss, {off_first:.3f} -> {off_last:.3f} without")


def test_lora_student(tmp_path, tokenizer, taught_pair) -> None:
    from peft import LoraConfig

    teacher, _ = taught_pair
    student = pruned_student(teacher, (0, 3))
    student.config.distill_pruning = _record(teacher, [0, 3])
    base = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path / "out", hidden_loss_weight=1.0, hidden_loss="mse", max_steps=12, learning_rate=1e-2),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    )
    assert trainer.hidden.pairs == [(0, 0), (1, 3)]  # the record is read through the peft wrapper
    trainer.train()
    hidden_first, hidden_last = first_last_mean(logged(trainer, "hidden_loss"))
    assert hidden_last < hidden_first
    merged = trainer.model.merge_and_unload().state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resumable_run(out: Path, tokenizer, resume: bool = False, stop_at: int | None = None):
    teacher, student = tiny_teacher_student(vocab_size=len(tokenizer))
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(out, max_steps=8, hidden_loss_weight=1.0, save_strategy="steps", save_steps=4),
        train_dataset=arithmetic_dataset(),
        processing_class=tokenizer,
        callbacks=[_StopAt(stop_at)] if stop_at else None,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return torch.cat([state_vector(trainer.model), state_vector(trainer.hidden)])


def test_resume_continues_the_learned_projections(tmp_path, tokenizer) -> None:
    reference = _resumable_run(tmp_path / "full", tokenizer)
    _resumable_run(tmp_path / "stopped", tokenizer, stop_at=4)
    assert (tmp_path / "stopped" / "checkpoint-4" / PROJECTIONS_FILE).is_file()
    resumed = _resumable_run(tmp_path / "stopped", tokenizer, resume=True)
    assert torch.allclose(resumed, reference, atol=1e-6, rtol=0), (resumed - reference).abs().max()


def test_4bit_teacher_gives_layer_states(tmp_path, tokenizer, taught_pair) -> None:
    pytest.importorskip("bitsandbytes")
    from distill.models import load_causal_lm

    teacher, _ = taught_pair
    teacher.save_pretrained(tmp_path / "teacher")
    exact = ModelTeacher(teacher)
    quantized = ModelTeacher(load_causal_lm(tmp_path / "teacher", quantization="4bit", dtype="float32"))
    ids = torch.randint(0, len(tokenizer), (2, 9))
    for wrapped in (exact, quantized):
        wrapped.request_hidden_states((1, 3))
    states = [wrapped.targets(ids).layer_states for wrapped in (exact, quantized)]
    for full, four_bit in zip(*states, strict=True):
        assert full.shape == four_bit.shape == (2, 9, 128)
        assert torch.nn.functional.cosine_similarity(full.float(), four_bit.float(), dim=-1).mean() > 0.9


# ---- refusals --------------------------------------------------------------------------------------


def test_teachers_without_hidden_states_are_refused(tmp_path, tokenizer, taught_pair) -> None:
    from distill.cache import build_cache
    from distill.teachers import CachedTeacher

    teacher, student = taught_pair
    build_cache(teacher, arithmetic_dataset(), tmp_path / "cache", tokenizer=tokenizer, top_k=8, progress=False)
    for other in (
        DataTeacher(len(tokenizer)),
        ServerTeacher("http://127.0.0.1:9", "teacher", vocab_rows=len(tokenizer)),
        CachedTeacher(tmp_path / "cache", tokenizer=tokenizer),
    ):
        with pytest.raises(ValueError, match="gives no hidden states"):
            _trainer(tmp_path, tokenizer, (other, copy.deepcopy(student)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_loss_weight=-1.0), "hidden_loss_weight"),
        (dict(hidden_loss_weight=float("nan")), "hidden_loss_weight"),
        (dict(hidden_loss="l1"), "hidden_loss="),
        (dict(hidden_projection="pca"), "hidden_projection"),
        (dict(hidden_loss_tokens="prompt"), "hidden_loss_tokens"),
        (dict(hidden_loss_weight=1.0, hidden_loss_tokens="all", packing=True), "packed"),
        (dict(hidden_layer_map="0-1"), "student:teacher"),
        (dict(hidden_layer_map="0:1,0:2"), "at most once"),
        (dict(hidden_layer_map="-1:2"), ">= 0"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "record", "message"),
    [
        (dict(hidden_layer_map="0:1,5:3"), None, "out of range"),
        (dict(hidden_projection="none"), None, "128"),
        ({}, {"teacher_num_hidden_layers": 30, "layers": [0, 29], "hidden_channels": None}, "another model"),
        ({}, {"teacher_num_hidden_layers": 4, "layers": [0, 3], "hidden_channels": [1, 2]}, "hidden channels"),
    ],
)
def test_bad_setups_are_refused_before_training(tmp_path, tokenizer, taught_pair, overrides, record, message) -> None:
    teacher, student = taught_pair
    if record is not None:
        student.config.distill_pruning = record
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, tokenizer, (teacher, student), **overrides)


@pytest.mark.slow
def test_two_processes_with_hidden_loss_and_a_sharded_teacher(tmp_path) -> None:
    """2 processes (gloo): the learned maps' gradients are averaged (ranks stay equal), and an FSDP2-sharded
    teacher's hooked layer outputs give the same training as a replicated teacher's."""
    from test_trainer_resume import TOL as RESUME_TOL
    from test_trainer_resume import _accelerate_launch

    for sharding in ("none", "fsdp"):
        _accelerate_launch(tmp_path / sharding, "--hidden-loss-weight", "1.0", "--teacher-sharding", sharding)
    weights = {
        (run, rank): torch.load(tmp_path / run / f"final-rank{rank}.pt") for run in ("none", "fsdp") for rank in (0, 1)
    }
    assert torch.equal(weights["none", 0], weights["none", 1])
    assert torch.equal(weights["fsdp", 0], weights["fsdp", 1])
    assert torch.allclose(weights["fsdp", 0], weights["none", 0], atol=RESUME_TOL, rtol=0)


def test_planner_counts_the_hidden_state_loss() -> None:
    from distill.planning import plan_from_config, plan_run

    common = dict(gpu="H100", max_length=2048, per_device_train_batch_size=2, lora_rank=16, suggest=False)
    pair = ("Qwen/Qwen2.5-Coder-7B", "Qwen/Qwen2.5-Coder-14B")
    off = plan_run(*pair, **common)
    learned = plan_run(*pair, hidden_layers=28, **common)
    selected = plan_run(*pair, hidden_layers=28, hidden_projection="select", **common)
    names = {item.name: item.bytes for item in learned.memory.items}
    assert names["hidden-state projections"] == 28 * 3584 * 5120 * 16  # fp32 weight, grad and two AdamW states
    assert names["hidden-state targets"] == 28 * 4096 * 5120 * 2  # bf16 teacher outputs of every mapped layer
    assert "hidden-state projections" not in {item.name for item in selected.memory.items}
    assert off.memory.total_bytes < selected.memory.total_bytes < learned.memory.total_bytes
    cfg = config("/tmp/unused", hidden_loss_weight=1.0, hidden_layer_map="0:3,27:47", max_length=2048)
    from_config = plan_from_config(cfg, *pair, per_device_train_batch_size=2, lora_rank=16, suggest=False)
    assert from_config.setup.hidden_layers == 2

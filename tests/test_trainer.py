"""`distill.Trainer` in each mode: the KD loss goes down, and the modes do what they say."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import arithmetic_dataset, build, config, first_last_mean, logged, pruned_student, state_vector

from distill import DistillConfig, Trainer
from distill.testing import tiny_llama

KD_METRICS = ("kd_loss", "top1_agreement", "teacher_entropy", "tokens_per_second", "on_policy_fraction")


def _assert_eval_improves(trainer, factor: float = 0.98) -> None:
    """Train, and check the KD loss on a fixed held-out set went down (free of batch-to-batch noise)."""
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < factor * before, (before, after)


def _assert_learns(trainer, key: str = "kd_loss", factor: float = 0.9) -> None:
    values = logged(trainer, key)
    assert len(values) >= 6, trainer.state.log_history
    first, last = first_last_mean(values)
    assert last < factor * first, f"{key} did not go down: {values}"


def test_off_policy_fused_learns_and_logs_kd_metrics(tmp_path, tokenizer, taught_pair) -> None:
    trainer = build(tmp_path, tokenizer, taught_pair)
    trainer.train()
    _assert_learns(trainer)
    entry = trainer.state.log_history[0]
    for key in KD_METRICS:
        assert key in entry, entry
    assert 0.0 <= entry["top1_agreement"] <= 1.0 and entry["teacher_entropy"] > 0
    assert entry["on_policy_fraction"] == 0.0
    assert trainer.data_reports["train"].num_rows == 32


def test_fused_and_dense_give_the_same_step(tmp_path, tokenizer, taught_pair) -> None:
    """One optimizer step on the fused path and on materialised logits lands on the same weights.

    Plain SGD at lr 1: the step is the gradient itself, so this compares the two gradients entry by
    entry. (Adam's first step, ``g / (|g| + eps)``, turns float32 rounding of gradients near 0 into
    differences of up to lr: the fused loss's closed-form gradient rounds differently from autograd.)
    """
    teacher, student = taught_pair
    results = {}
    for implementation in ("fused", "dense"):
        copy = tiny_llama(vocab_size=len(tokenizer), seed=1)
        copy.load_state_dict(student.state_dict())
        trainer = build(
            tmp_path / implementation,
            tokenizer,
            (teacher, copy),
            max_steps=1,
            loss_implementation=implementation,
            ce_weight=0.3,
            temperature=1.5,
            loss="reverse_kl",
            optim="sgd",
            learning_rate=1.0,
        )
        trainer.train()
        results[implementation] = (logged(trainer, "loss")[0], state_vector(copy))
    assert abs(results["fused"][0] - results["dense"][0]) < 1e-5
    assert torch.allclose(results["fused"][1], results["dense"][1], atol=1e-6)


@pytest.mark.parametrize("layout", ["prompt_completion", "text"])
def test_other_row_layouts_train(tmp_path, tokenizer, taught_pair, layout) -> None:
    trainer = build(tmp_path, tokenizer, taught_pair, dataset=arithmetic_dataset(layout=layout), max_steps=16)
    trainer.train()
    _assert_learns(trainer)


def test_packing_learns_and_matches_unpacked_loss(tmp_path, tokenizer, tiny_pair, taught_pair) -> None:
    """A packed row of two documents has the same loss as the two documents padded in one batch."""
    dataset = arithmetic_dataset(count=2, layout="text")
    packed = build(tmp_path / "p", tokenizer, tiny_pair, dataset=dataset, packing=True, max_length=128)
    padded = build(tmp_path / "u", tokenizer, tiny_pair, dataset=dataset)
    assert len(packed.train_dataset) == 1 and len(padded.train_dataset) == 2
    losses = []
    for trainer in (packed, padded):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        trainer.model.eval()
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
    assert abs(losses[0] - losses[1]) < 1e-5, losses

    trainer = build(tmp_path / "t", tokenizer, taught_pair, packing=True, max_length=128)
    trainer.train()
    _assert_learns(trainer)


def test_on_policy_generates_and_learns(tmp_path, tokenizer, taught_pair) -> None:
    trainer = build(tmp_path, tokenizer, taught_pair, lmbda=1.0, max_steps=16)
    trainer.train()
    assert logged(trainer, "on_policy_fraction") == [1.0] * 16
    _assert_learns(trainer)


def test_half_on_policy_mixes_steps(tmp_path, tokenizer, taught_pair) -> None:
    trainer = build(tmp_path, tokenizer, taught_pair, lmbda=0.5, max_steps=12)
    trainer.train()
    fractions = logged(trainer, "on_policy_fraction")
    assert 0 < sum(fractions) < len(fractions), fractions


def test_sequence_level_kd_trains_on_teacher_text(tmp_path, tokenizer, taught_pair) -> None:
    trainer = build(tmp_path, tokenizer, taught_pair, seq_kd=True, max_steps=16)
    trainer.train()
    assert logged(trainer, "on_policy_fraction") == [1.0] * 16
    _assert_learns(trainer)


def test_lora_student_trains_only_adapters(tmp_path, tokenizer, taught_pair) -> None:
    peft = pytest.importorskip("peft")
    teacher, _ = taught_pair
    student = pruned_student(teacher)
    base_before = {k: v.clone() for k, v in student.state_dict().items()}
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0
    )
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path / "lora", learning_rate=1e-2, gradient_checkpointing=True),
        train_dataset=arithmetic_dataset(),
        eval_dataset=arithmetic_dataset(count=16, seed=1),
        processing_class=tokenizer,
        peft_config=lora,
    )
    _assert_eval_improves(trainer)
    merged = trainer.model.get_base_model().state_dict()
    for name, before in base_before.items():
        if "lora" not in name and name in merged:
            assert torch.equal(merged[name], before), f"base weight {name} changed"


def test_eval_logs_kd_metrics(tmp_path, tokenizer, tiny_pair) -> None:
    teacher, student = tiny_pair
    trainer = Trainer(
        model=student,
        teacher=teacher,
        args=config(tmp_path, max_steps=2),
        train_dataset=arithmetic_dataset(),
        eval_dataset=arithmetic_dataset(count=8, seed=1),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0
    assert "eval_kd_loss" in trainer.state.log_history[-1] and "eval_top1_agreement" in trainer.state.log_history[-1]


def test_config_rejects_bad_fields() -> None:
    for bad, match in (
        (dict(loss="kl_div"), "not a distillation loss"),
        (dict(beta=1.5), "beta"),
        (dict(lmbda=2.0), "lmbda"),
        (dict(temperature=0.0), "temperature"),
        (dict(kd_weight=0.0, ce_weight=0.0), "nothing would be learned"),
        (dict(packing=True, lmbda=0.5), "packing"),
        (dict(teacher_dtype="int3"), "teacher_dtype"),
        (dict(loss_chunk_size=0), "loss_chunk_size"),
    ):
        with pytest.raises(ValueError, match=match):
            DistillConfig(output_dir="unused", report_to=[], **bad)


def test_qlora_student_with_4bit_teacher_learns_on_policy(tmp_path, tokenizer, taught_pair) -> None:
    """The CPU 4-bit trap: a QLoRA student must still learn after generate() switched its kernels."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from distill.models import load_causal_lm

    teacher, _ = taught_pair
    teacher.save_pretrained(tmp_path / "teacher")
    pruned_student(teacher).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student_4bit = load_causal_lm(tmp_path / "student", quantization="4bit", dtype="float32")
    lora = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], lora_dropout=0.0
    )
    trainer = Trainer(
        model=student_4bit,
        teacher=str(tmp_path / "teacher"),  # loaded by the trainer, in 4-bit
        args=config(
            tmp_path / "out", lmbda=1.0, teacher_quantization="4bit", teacher_dtype="float32", learning_rate=1e-2
        ),
        train_dataset=arithmetic_dataset(),
        eval_dataset=arithmetic_dataset(count=16, seed=1),
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert type(trainer.teacher.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    first_layer_lora = [p for n, p in trainer.model.named_parameters() if "layers.0." in n and "lora_B" in n]
    before = [p.detach().clone() for p in first_layer_lora]
    _assert_eval_improves(trainer)
    assert logged(trainer, "on_policy_fraction") == [1.0] * 16
    # Without the fix the first layer's LoRA B receives exactly zero gradient after generate() on this CPU.
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, first_layer_lora, strict=True))


def test_gradient_checkpointing_is_non_reentrant_unless_asked(tmp_path, tokenizer, tiny_pair) -> None:
    """Reentrant checkpointing breaks DDP + LoRA ("mark a variable ready only once") and is transformers 4.x's
    default: DistillConfig asks for the non-reentrant kind, and the student trains with it; a user's choice stays."""
    trainer = build(tmp_path, tokenizer, tiny_pair, gradient_checkpointing=True, max_steps=1)
    trainer.train()
    functions = [
        m._gradient_checkpointing_func for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False)
    ]
    assert functions and all(f.keywords.get("use_reentrant") is False for f in functions)
    asked = config(
        tmp_path / "asked", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}
    )
    assert asked.gradient_checkpointing_kwargs == {"use_reentrant": True}

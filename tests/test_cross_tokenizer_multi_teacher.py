"""Several teachers (one of the student's tokenizer, one of another): mixture, routing, per-teacher metrics."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_cross_tokenizer_trainer import _taught_cross_teacher_state, _teacher_tokenizer
from trainer_helpers import arithmetic_dataset, config, logged, taught_pair

from distill import Trainer
from distill.testing import arithmetic_rows, tiny_llama


def _teachers(tokenizer):  # noqa: ANN001, ANN202
    same_teacher, _ = taught_pair(tokenizer)
    cross_teacher = tiny_llama(len(_teacher_tokenizer()), num_layers=4, seed=3)
    cross_teacher.load_state_dict(_taught_cross_teacher_state())
    return {"same": same_teacher, "cross": cross_teacher}, {"same": tokenizer, "cross": _teacher_tokenizer()}


def _batch_loss(tmp_path, tokenizer, teacher, teacher_tokenizer, dataset, **overrides) -> torch.Tensor:  # noqa: ANN001
    student = tiny_llama(len(tokenizer), seed=11)
    args = config(tmp_path, cross_tokenizer="auto", vocab_map_dir=str(tmp_path / "maps"), ce_weight=0.3, **overrides)
    trainer = Trainer(model=student, teacher=teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
                      teacher_processing_class=teacher_tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch)


def test_mixture_weights_and_routing_reduce_to_single_teachers(tmp_path, tokenizer) -> None:  # noqa: ANN001
    teachers, tokenizers = _teachers(tokenizer)
    data = arithmetic_dataset(8)
    alone = {
        name: _batch_loss(tmp_path / name, tokenizer, teachers[name], tokenizers[name], data) for name in teachers
    }
    # A mixture with all weight on one teacher is that teacher alone (CE counted once).
    for weights, name in (([1.0, 0.0], "same"), ([0.0, 1.0], "cross")):
        mixed = _batch_loss(tmp_path / f"w{name}", tokenizer, teachers, tokenizers, data, teacher_weights=weights)
        assert torch.allclose(mixed, alone[name], rtol=1e-5), (weights, mixed, alone[name])
    # An equal mixture is the mean of both KD terms plus the CE once: between the two.
    half = _batch_loss(tmp_path / "half", tokenizer, teachers, tokenizers, data)
    assert min(alone.values()) <= half <= max(alone.values())
    # Routing every row to one teacher is that teacher alone.
    for name in teachers:
        routed = Dataset.from_list([dict(row, teacher=name) for row in arithmetic_rows(8)])
        loss = _batch_loss(
            tmp_path / f"r{name}", tokenizer, teachers, tokenizers, routed, teacher_route_column="teacher"
        )
        assert torch.allclose(loss, alone[name], rtol=1e-5), (name, loss, alone[name])


def test_two_teachers_train_with_per_teacher_metrics(tmp_path, tokenizer) -> None:  # noqa: ANN001
    teachers, tokenizers = _teachers(tokenizer)
    rows = [dict(row, teacher=("same", "cross")[i % 2]) for i, row in enumerate(arithmetic_rows(32))]
    for route in (None, "teacher"):
        student = tiny_llama(len(tokenizer), seed=11)
        args = config(tmp_path / str(route), max_steps=6, cross_tokenizer="auto", teacher_route_column=route,
                      vocab_map_dir=str(tmp_path / "maps"), teacher_weights=[0.5, 0.5])  # fmt: skip
        trainer = Trainer(model=student, teacher=teachers, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, teacher_processing_class=tokenizers)  # fmt: skip
        trainer.train()
        for key in ("kd_loss/same", "kd_loss/cross", "top1_agreement/cross"):
            values = logged(trainer, key)
            assert values and all(v == v for v in values), key
        kd = logged(trainer, "kd_loss")
        assert kd[-1] < kd[0]


def test_ensemble_refusals(tmp_path, tokenizer) -> None:  # noqa: ANN001
    teachers, tokenizers = _teachers(tokenizer)
    with pytest.raises(ValueError, match="teacher_weights"):
        _batch_loss(tmp_path, tokenizer, teachers, tokenizers, arithmetic_dataset(8), teacher_weights=[1.0])
    with pytest.raises(ValueError, match="none of the teachers"):
        bad = Dataset.from_list([dict(row, teacher="nobody") for row in arithmetic_rows(8)])
        _batch_loss(tmp_path, tokenizer, teachers, tokenizers, bad, teacher_route_column="teacher")

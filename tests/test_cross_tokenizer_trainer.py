"""`Trainer` with a teacher whose tokenizer differs from the student's: it aligns, learns, equals the usual loss."""

from __future__ import annotations

import functools

import pytest
import torch
from cross_tokenizer_helpers import CORPUS, byte_bpe
from trainer_helpers import arithmetic_dataset, config, first_last_mean, logged, taught_pair

from distill import Trainer
from distill.losses import VocabularyMismatchError
from distill.testing import arithmetic_rows, tiny_llama


@functools.cache
def _teacher_tokenizer():  # noqa: ANN202
    texts = [str(row["messages"]) for row in arithmetic_rows(200, seed=5)] + CORPUS
    return byte_bpe(600, texts, split_digits=True)


@functools.cache
def _taught_cross_teacher_state() -> dict[str, torch.Tensor]:
    """A tiny teacher taught the arithmetic task in its own tokenizer and chat template (Llama-3 headers)."""
    tokenizer = _teacher_tokenizer()
    teacher = tiny_llama(len(tokenizer), num_layers=4, seed=3)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in arithmetic_rows(256, seed=123)]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(100):
        rows = torch.randint(0, len(texts), (16,), generator=generator)
        teacher(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                labels=labels[rows]).loss.backward()  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in teacher.state_dict().items()}


def _cross_trainer(tmp_path, tokenizer, **overrides) -> Trainer:  # noqa: ANN001
    teacher_tokenizer = _teacher_tokenizer()
    teacher = tiny_llama(len(teacher_tokenizer), num_layers=4, seed=3)
    teacher.load_state_dict(_taught_cross_teacher_state())
    student = tiny_llama(len(tokenizer), seed=11)
    settings = dict(cross_tokenizer="auto", vocab_map_dir=str(tmp_path / "maps"))
    settings.update(overrides)
    return Trainer(
        model=student, teacher=teacher, args=config(tmp_path / "out", **settings),
        train_dataset=arithmetic_dataset(), eval_dataset=arithmetic_dataset(8, seed=99), processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )  # fmt: skip


@pytest.mark.parametrize("loss", ["pkl", "uld", "gold"])
def test_cross_tokenizer_distillation_learns(tmp_path, tokenizer, loss) -> None:  # noqa: ANN001
    trainer = _cross_trainer(tmp_path, tokenizer, cross_tokenizer_loss=loss, loss="jsd", beta=0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["teacher_input_ids"].shape[0] == 2 and (batch["xt_student_pos"] >= 0).sum() > 10
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.9 * before, (before, after)
    first, last = first_last_mean(logged(trainer, "kd_loss"))
    assert last < first, logged(trainer, "kd_loss")
    assert 0.0 <= logged(trainer, "top1_agreement")[-1] <= 1.0


def test_identical_tokenizers_through_the_cross_path_give_the_usual_loss(tmp_path, tokenizer) -> None:  # noqa: ANN001
    """cross_tokenizer='on' with the student's own tokenizer: every span is one token; the loss is the usual one."""
    teacher, student = taught_pair(tokenizer)
    losses = {}
    for mode in ("off", "on"):
        trainer = Trainer(
            model=student, teacher=teacher, args=config(tmp_path / mode, cross_tokenizer=mode, ce_weight=0.3,
                                                        vocab_map_dir=str(tmp_path / "maps")),
            train_dataset=arithmetic_dataset(8), processing_class=tokenizer, teacher_processing_class=tokenizer,
        )  # fmt: skip
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(trainer.model, batch)
    assert torch.allclose(losses["on"], losses["off"], rtol=1e-6), losses


def test_mismatch_is_refused_when_off_and_unsupported_settings_are_refused(tmp_path, tokenizer) -> None:  # noqa: ANN001
    with pytest.raises(VocabularyMismatchError, match="differ"):
        _cross_trainer(tmp_path, tokenizer, cross_tokenizer="off")
    with pytest.raises(ValueError, match="packing"):
        _cross_trainer(tmp_path, tokenizer, packing=True)
    with pytest.raises(ValueError, match="cross_tokenizer_loss"):
        config(tmp_path, cross_tokenizer_loss="xtoken")


def test_cross_tokenizer_from_a_cache_equals_the_live_topk_teacher(tmp_path, tokenizer) -> None:  # noqa: ANN001
    """The cache holds the teacher's top-k on the teacher's own tokens (keyed by their hash, under its tokenizer's
    fingerprint): the student trains from it with no teacher model, exactly as from the live top-k."""
    from distill.cache import build_cache
    from distill.formats.reader import CacheMismatchError
    from distill.teachers import CachedTeacher, TopKTeacher

    teacher_tokenizer = _teacher_tokenizer()
    teacher = tiny_llama(len(teacher_tokenizer), num_layers=4, seed=3)
    teacher.load_state_dict(_taught_cross_teacher_state())
    data = arithmetic_dataset(16)
    manifest = build_cache(teacher, data, tmp_path / "cache", tokenizer=teacher_tokenizer, top_k=16, encoding="fp16",
                           max_length=64, progress=False)  # fmt: skip
    assert manifest["config"]["tokenizer"]["size"] == len(teacher_tokenizer)
    assert 0 < manifest["totals"]["file_bytes_per_token"] < 200
    losses = {}
    for name, source in (
        ("cached", CachedTeacher(tmp_path / "cache")),
        ("live", TopKTeacher(teacher, 16, encoding="fp16")),
    ):
        student = tiny_llama(len(tokenizer), seed=11)
        trainer = Trainer(
            model=student, teacher=source, args=config(tmp_path / name, max_steps=4, cross_tokenizer="auto",
                                                       vocab_map_dir=str(tmp_path / "maps"), ce_weight=0.2),
            train_dataset=data, processing_class=tokenizer, teacher_processing_class=teacher_tokenizer,
        )  # fmt: skip
        trainer.train()
        losses[name] = logged(trainer, "loss")
    assert losses["cached"] == pytest.approx(losses["live"], abs=1e-5)
    assert losses["cached"][-1] < losses["cached"][0]
    with pytest.raises(CacheMismatchError, match="another tokenizer"):  # the cache's fingerprint is the teacher's
        Trainer(model=tiny_llama(len(tokenizer)), teacher=CachedTeacher(tmp_path / "cache"),
                args=config(tmp_path / "x", cross_tokenizer="auto"), train_dataset=data, processing_class=tokenizer,
                teacher_processing_class=byte_bpe(400, CORPUS))  # fmt: skip

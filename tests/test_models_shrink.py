"""student_from_teacher: a depth-reduced copy of a teacher that runs, generates and trains on its own."""

from __future__ import annotations

import pytest
import torch

from distill.models import evenly_spaced_layers, student_from_teacher
from distill.testing import tiny_llama, tiny_qwen2


def test_evenly_spaced_layers() -> None:
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(4, 1) == [3]
    with pytest.raises(ValueError, match="Keep between 1 and 4"):
        evenly_spaced_layers(4, 5)


def test_keeping_every_layer_reproduces_the_teacher_and_copies_weights() -> None:
    teacher = tiny_llama(97, num_layers=3, tie_word_embeddings=True).eval()
    student = student_from_teacher(teacher, 3).eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=0)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tying survives the copy
    assert student.lm_head.weight is not teacher.lm_head.weight
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.zero_()
    assert teacher.model.layers[0].mlp.up_proj.weight.abs().sum() > 0


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_a_layer_subset_matches_running_those_teacher_layers(build) -> None:
    teacher = build(97, num_layers=4).eval()
    student = student_from_teacher(teacher, [0, 3]).eval()
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert len(teacher.model.layers) == 4 and teacher.config.num_hidden_layers == 4
    if getattr(student.config, "layer_types", None) is not None:
        assert len(student.config.layer_types) == 2
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    # Reference: the teacher with its middle layers removed from the forward pass.
    layers = teacher.model.layers
    teacher.model.layers = torch.nn.ModuleList([layers[0], layers[3]])
    try:
        expected = teacher(input_ids=ids).logits
    finally:
        teacher.model.layers = layers
    torch.testing.assert_close(student(input_ids=ids).logits, expected)
    # The KV cache is indexed by the renumbered layers: cached greedy decoding equals uncached.
    cached = student.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_the_student_trains_and_bad_indices_are_refused() -> None:
    teacher = tiny_llama(97, num_layers=4)
    student = student_from_teacher(teacher, 2, dtype=torch.float32)
    assert student.training and all(p.requires_grad for p in student.parameters())
    ids = torch.randint(0, 97, (2, 8))
    student(input_ids=ids, labels=ids).loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert teacher.model.layers[0].self_attn.q_proj.weight.grad is None
    with pytest.raises(ValueError, match="distinct and in"):
        student_from_teacher(teacher, [0, 0])
    with pytest.raises(ValueError, match="distinct and in"):
        student_from_teacher(teacher, [5])

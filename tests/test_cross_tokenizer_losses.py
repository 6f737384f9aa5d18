"""Cross-tokenizer losses over aligned spans: float64 references, identical-tokenizer equality, gradients."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close
from reference_cross_vocab import cross_vocab_ref

from distill.losses import SparseTargets, TeacherHead, fused_distillation_loss
from distill.losses.cross_vocab import VocabProjection, cross_vocab_loss
from distill.losses.divergences import Divergence
from distill.losses.objective import Objective

# Against the float64 reference, relative to the largest entry. Over 10 fresh-seed runs of this module the worst
# value was 3.2e-7 and the worst gradient 7e-7 (make margins); GOLD's cancelled unmatched mass was 1.6e-4.
VALUE_TOL, GRAD_TOL = 2e-6, 1e-5


def _random_problem(seed: int, n: int = 23, v_s: int = 37, v_t: int = 29, h: int = 8, h_t: int = 6):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v_s, h, generator=gen)
    labels = torch.randint(0, v_s, (n,), generator=gen)
    labels[3] = -100
    span_of_row = torch.full((n,), -1, dtype=torch.long)
    kd_rows = torch.randperm(n, generator=gen)[: n // 2].sort().values
    span_of_row[kd_rows] = torch.arange(kd_rows.numel())
    teacher_hidden = torch.randn(kd_rows.numel(), h_t, generator=gen)
    teacher_weight = torch.randn(v_t, h_t, generator=gen) * 2
    # Classes: teacher ids 0..v_t-1; most student tokens pinned, some collapsing, one to "elsewhere".
    student_classes = torch.randint(0, v_t, (v_s,), generator=gen)
    student_classes[:v_t] = torch.arange(v_t)
    teacher_classes = torch.arange(v_t)
    teacher_classes[-3:] = torch.tensor([0, 1, 1])  # tokens the student cannot express merge into others
    student_classes[student_classes >= v_t - 3] = 2
    student_classes[-1] = v_t  # elsewhere
    projection = VocabProjection(student_classes, teacher_classes, v_t + 1, torch.arange(5), torch.arange(5))
    return hidden, weight, labels, span_of_row, teacher_hidden, teacher_weight, projection


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("kind", ["pkl", "uld", "gold"])
def test_dense_teacher_matches_float64_reference(seed: int, kind: str, divergence: str) -> None:
    if kind == "uld" and divergence != "forward_kl":
        pytest.skip("ULD has no divergence parameter")
    hidden, weight, labels, span_of_row, t_hidden, t_weight, projection = _random_problem(seed)
    objective = Objective(Divergence(divergence, beta=0.3), temperature=1.5 if kind == "pkl" else 1.0,
                          kd_weight=0.7, ce_weight=0.4)  # fmt: skip
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = cross_vocab_loss(hidden, weight, labels, span_of_row, TeacherHead(t_hidden, t_weight), projection, kind,
                           objective, chunk_size=5)  # fmt: skip
    out.loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref, ref_kd = cross_vocab_ref(
        h64 @ w64.T, labels, span_of_row, t_hidden.double() @ t_weight.double().T, projection.student_classes,
        projection.teacher_classes, projection.num_classes, kind, divergence, 0.3, objective.temperature, 0.7, 0.4,
        matched=(projection.matched_student, projection.matched_teacher),
    )  # fmt: skip
    ref.backward()
    assert_close(out.loss, ref, VALUE_TOL, "loss")
    assert_close(out.kd_loss, ref_kd, VALUE_TOL, "kd_loss")
    assert_close(hidden.grad, h64.grad, GRAD_TOL, "grad hidden")
    assert_close(weight.grad, w64.grad, GRAD_TOL, "grad weight")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gold_with_a_confident_teacher_matches_float64(seed: int, divergence: str) -> None:
    """A teacher holding all but ~1e-9 of its mass on matched tokens: GOLD's unmatched mass is its own logsumexp.

    Computed as log(1 - matched mass) it cancelled (reverse KL was 1.6e-4 off at ordinary draws) and a clamp
    floored it at 1e-7, so here reverse KL was off by the student's unmatched mass times log(100).
    """
    hidden, weight, labels, span_of_row, t_hidden, t_weight, projection = _random_problem(seed)
    bias = torch.zeros(t_weight.shape[0])
    bias[int(projection.matched_teacher[0])] = 60.0  # unmatched mass ~e^-30 at every row (logits spread ~+-15)
    objective = Objective(Divergence(divergence, beta=0.3), kd_weight=0.7, ce_weight=0.4)
    out = cross_vocab_loss(hidden, weight, labels, span_of_row, TeacherHead(t_hidden, t_weight, bias), projection,
                           "gold", objective, chunk_size=5)  # fmt: skip
    teacher_logits = t_hidden.double() @ t_weight.double().T + bias.double()
    rest = torch.ones(t_weight.shape[0], dtype=torch.bool)
    rest[projection.matched_teacher] = False
    assert float(torch.log_softmax(teacher_logits, -1)[:, rest].exp().sum(-1).max()) < 1e-9  # below the old clamp
    _, ref_kd = cross_vocab_ref(
        hidden.double() @ weight.double().T, labels, span_of_row, teacher_logits, projection.student_classes,
        projection.teacher_classes, projection.num_classes, "gold", divergence, 0.3, 1.0, 0.7, 0.4,
        matched=(projection.matched_student, projection.matched_teacher),
    )  # fmt: skip
    assert_close(out.kd_loss, ref_kd, VALUE_TOL, "kd_loss")


@pytest.mark.parametrize("kind", ["pkl", "uld"])
def test_sparse_teacher_matches_float64_reference(seed: int, kind: str) -> None:
    hidden, weight, labels, span_of_row, t_hidden, t_weight, projection = _random_problem(seed)
    teacher_logprobs = torch.log_softmax(t_hidden @ t_weight.T, dim=-1)
    top = teacher_logprobs.topk(6, dim=-1)
    ids = top.indices.clone()
    ids[0, :3] = torch.tensor([26, 27, 28])  # merged teacher tokens: duplicate classes inside one row's top-k
    logprobs = teacher_logprobs.gather(-1, ids)
    hidden.requires_grad_(True)
    objective = Objective(Divergence("jsd", beta=0.5), ce_weight=0.2)
    out = cross_vocab_loss(hidden, weight, labels, span_of_row, SparseTargets(ids, logprobs), projection, kind,
                           objective, chunk_size=4)  # fmt: skip
    out.loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    ref, _ = cross_vocab_ref(
        h64 @ weight.double().T, labels, span_of_row, None, projection.student_classes, projection.teacher_classes,
        projection.num_classes, kind, "jsd", 0.5, 1.0, 1.0, 0.2, sparse=(ids, logprobs),
    )  # fmt: skip
    ref.backward()
    assert_close(out.loss, ref, VALUE_TOL, "loss")
    assert_close(hidden.grad, h64.grad, GRAD_TOL, "grad hidden")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
def test_identical_tokenizers_reproduce_the_same_vocabulary_loss(seed: int, divergence: str) -> None:
    """Identity map, every token a span of its own: the projected loss is the fused same-vocabulary loss."""
    gen = torch.Generator().manual_seed(seed)
    n, v, h = 19, 41, 8
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    teacher_hidden, teacher_weight = torch.randn(n, 5, generator=gen), torch.randn(v, 5, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    identity = torch.arange(v)
    projection = VocabProjection(identity, identity, v, identity, identity)
    span_of_row = torch.arange(n)
    kwargs = dict(beta=0.3, temperature=1.0, kd_weight=0.8, ce_weight=0.3)
    objective = Objective(Divergence(divergence, beta=0.3), kd_weight=0.8, ce_weight=0.3)
    grads = []
    outs = []
    for cross in (True, False):
        h_leaf = hidden.clone().requires_grad_(True)
        if cross:
            out = cross_vocab_loss(h_leaf, weight, labels, span_of_row, TeacherHead(teacher_hidden, teacher_weight),
                                   projection, "pkl", objective, chunk_size=7)  # fmt: skip
        else:
            out = fused_distillation_loss(h_leaf, weight, TeacherHead(teacher_hidden, teacher_weight), labels,
                                          divergence, chunk_size=7, **kwargs)  # fmt: skip
        out.loss.backward()
        outs.append(out)
        grads.append(h_leaf.grad)
    cross_out, same_out = outs
    # The same-vocabulary closed form sums p * (log p - log q) as a row dot product (bmm) and the mixtures'
    # log-sum-exp by another (equally exact) route: float32 rounding only.
    assert torch.allclose(cross_out.loss, same_out.loss, rtol=1e-6, atol=0)
    # The cross path's autograd backward through the copy-per-class and the same-vocabulary loss's closed-form
    # gradient take other summation orders: float32 rounding only (gradients here are ~1e-2; 1e-6 is ~1e-4 of that).
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(cross_out.kd_loss, same_out.kd_loss, rtol=1e-6)
    assert torch.equal(cross_out.top1_agreement, same_out.top1_agreement)


def test_identical_tokenizers_sparse_equals_sparse_same_vocabulary_loss(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n, v, h = 13, 50, 8
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    teacher_logprobs = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, dim=-1)
    top = teacher_logprobs.topk(8, dim=-1)
    labels = torch.randint(0, v, (n,), generator=gen)
    identity = torch.arange(v)
    projection = VocabProjection(identity, identity, v, identity, identity)
    targets = SparseTargets(top.indices, top.values)
    cross = cross_vocab_loss(hidden, weight, labels, torch.arange(n), targets, projection, "pkl",
                             Objective(Divergence("forward_kl")))  # fmt: skip
    same = fused_distillation_loss(hidden, weight, targets, labels, "forward_kl")
    assert torch.allclose(cross.loss, same.loss, rtol=1e-6, atol=0)  # float32 rounding only (row dot products)


def test_no_span_rows_gives_ce_only_and_a_zero_kd() -> None:
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(7, 3)
    identity = torch.arange(7)
    projection = VocabProjection(identity, identity, 7, identity, identity)
    labels = torch.tensor([1, 2, -100, 3])
    out = cross_vocab_loss(hidden, weight, labels, torch.full((4,), -1), TeacherHead(torch.zeros(0, 2),
                           torch.randn(7, 2)), projection, "pkl", Objective(ce_weight=1.0))  # fmt: skip
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum") / 4
    assert torch.allclose(out.loss, expected)
    assert float(out.kd_loss) == 0.0
    out.loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_gold_refuses_a_sparse_teacher() -> None:
    identity = torch.arange(5)
    projection = VocabProjection(identity, identity, 5, identity, identity)
    targets = SparseTargets(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.2]])))
    with pytest.raises(ValueError, match="dense teacher"):
        cross_vocab_loss(torch.randn(1, 3), torch.randn(5, 3), torch.tensor([1]), torch.tensor([0]), targets,
                         projection, "gold")  # fmt: skip

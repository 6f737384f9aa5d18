"""The three forms agree with each other, the edge cases between them, and the input checks.

Fresh random inputs each run; the seed is printed (``DISTILL_TEST_SEED=<seed>`` replays it).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from reference import Rng, assert_close, dense_loss_ref, sparse_loss_ref

from distill.losses import (
    DIVERGENCES,
    DistillationOutput,
    Divergence,
    FusedDistillationLoss,
    Objective,
    OutputHead,
    SparseTargets,
    TeacherHead,
    VocabularyMismatchError,
    distillation_loss,
    fused_distillation_loss,
    sparse_distillation_loss,
)
from distill.losses.dense import dense_objective_loss
from distill.losses.fused import fused_objective_loss

TOL = 1e-5
# Hidden-state gradients of the fused loss are a float32 contraction over the vocabulary whose
# terms nearly cancel; see HIDDEN_GRAD_TOL in test_losses_reference.py.
HIDDEN_GRAD_TOL = 5e-5
PARAMS = dict(beta=0.3, alpha=0.1)
SHAPE = (2, 13, 16, 53)  # batch, seq, hidden, vocab


def _head(rng: Rng, rows: int, hidden: int, bias: bool = True):
    weight = rng.grid(rows, hidden, scale=1 / math.sqrt(hidden)).requires_grad_(True)
    return weight, (rng.grid(rows, scale=0.5).requires_grad_(True) if bias else None)


def _grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_teacher_head_equals_dense(name, rng) -> None:
    batch, seq, hidden, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    h = rng.grid(batch, seq, hidden).requires_grad_(True)
    w, b = _head(rng, vocab, hidden)
    teacher = TeacherHead(rng.grid(batch, seq, 9), rng.grid(vocab, 9, scale=0.7), rng.grid(vocab), softcap=4.0)
    kw = dict(PARAMS, ce_weight=0.2, temperature=1.3)
    fused = fused_distillation_loss(
        h, w, teacher, labels, name, student_bias=b, student_softcap=5.0, chunk_size=6, **kw
    )
    fused.loss.backward()
    fused_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    student_logits = 5.0 * torch.tanh((h @ w.T + b) / 5.0)
    teacher_logits = 4.0 * torch.tanh((teacher.hidden @ teacher.weight.T + teacher.bias) / 4.0)
    dense = distillation_loss(student_logits, teacher_logits, labels, name, **kw)
    dense.loss.backward()
    _check_same(fused, dense)
    for what, g_fused, g_dense in zip(("hidden", "weight", "bias"), fused_grads, _grads(h, w, b), strict=True):
        assert_close(g_fused, g_dense, HIDDEN_GRAD_TOL if what == "hidden" else TOL, f"grad {what}")


def test_fused_objective_loss_is_the_keyword_form_without_the_rebuild(rng) -> None:
    """The trainer's entry point: an Objective handed over as is gives the keyword form's loss and gradients."""
    batch, seq, hidden, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    h = rng.grid(batch, seq, hidden).requires_grad_(True)
    w, b = _head(rng, vocab, hidden)
    teacher = TeacherHead(rng.grid(batch, seq, 9), rng.grid(vocab + 3, 9, scale=0.7))  # 3 padding rows
    kw = dict(beta=0.3, alpha=0.1, temperature=1.3, kd_weight=0.8, ce_weight=0.2, vocab_size=vocab)
    by_keywords = fused_distillation_loss(h, w, teacher, labels, "jsd", student_bias=b, chunk_size=6, **kw)
    by_keywords.loss.backward()
    keyword_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    objective = Objective.from_kwargs("jsd", **kw)
    out = fused_objective_loss(h, w, teacher, labels, objective, student_bias=b, chunk_size=6)
    out.loss.backward()
    _check_same(out, by_keywords)
    for got, want in zip(_grads(h, w, b), keyword_grads, strict=True):
        assert torch.equal(got, want)  # the same computation, bit for bit
    with pytest.raises(VocabularyMismatchError):  # no shared range given: the heads differ, as in the keyword form
        fused_objective_loss(h, w, teacher, labels, dataclasses.replace(objective, vocab_size=None))


def test_student_head_as_one_output_head_is_the_weight_bias_softcap_form(rng) -> None:
    """The student's head given as one OutputHead: the same loss and gradients as weight + bias + soft-cap beside."""
    batch, seq, hidden, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    h = rng.grid(batch, seq, hidden).requires_grad_(True)
    w, b = _head(rng, vocab, hidden)
    teacher = TeacherHead(rng.grid(batch, seq, 9), rng.grid(vocab, 9, scale=0.7))
    kw = dict(beta=0.3, temperature=1.3, ce_weight=0.2, chunk_size=6)
    beside = fused_distillation_loss(h, w, teacher, labels, "jsd", student_bias=b, student_softcap=5.0, **kw)
    beside.loss.backward()
    beside_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    one_head = fused_distillation_loss(h, OutputHead(w, b, 5.0), teacher, labels, "jsd", **kw)
    one_head.loss.backward()
    _check_same(one_head, beside)
    for got, want in zip(_grads(h, w, b), beside_grads, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="not both"):  # two places saying what the head is
        fused_distillation_loss(h, OutputHead(w, b), teacher, labels, "jsd", student_softcap=5.0)


def test_dense_objective_loss_is_the_keyword_form_without_the_rebuild(rng) -> None:
    """The trainer's dense entry point: an Objective handed over as is gives the keyword form's loss and gradient."""
    batch, seq, _, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    student = rng.grid(batch, seq, vocab).requires_grad_(True)
    teacher = rng.grid(batch, seq, vocab + 3)  # 3 padding columns
    kw = dict(beta=0.3, alpha=0.1, temperature=1.3, kd_weight=0.8, ce_weight=0.2, vocab_size=vocab)
    by_keywords = distillation_loss(student, teacher, labels, "skew_kl", **kw)
    by_keywords.loss.backward()
    keyword_grad, student.grad = student.grad, None
    out = dense_objective_loss(student, teacher, labels, Objective.from_kwargs("skew_kl", **kw))
    out.loss.backward()
    _check_same(out, by_keywords)
    assert torch.equal(student.grad, keyword_grad)  # the same computation, bit for bit
    with pytest.raises(VocabularyMismatchError):  # no shared range given: the widths differ
        dense_objective_loss(student, teacher, labels, Objective.from_kwargs("skew_kl"))


def _check_same(a: DistillationOutput, b: DistillationOutput) -> None:
    assert a.num_tokens == b.num_tokens
    for field in ("loss", "kd_loss", "ce_loss", "teacher_entropy"):
        assert_close(getattr(a, field), getattr(b, field), TOL, field)
    assert abs(float(a.top1_agreement) - float(b.top1_agreement)) <= 1.5 / max(a.num_tokens, 1)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_sparse_equals_sparse(name, tail, rng) -> None:
    batch, seq, hidden, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    h = rng.grid(batch, seq, hidden).requires_grad_(True)
    w, b = _head(rng, vocab, hidden)
    ids, logprobs, tail_mass = rng.topk(rng.randn(batch, seq, vocab, scale=2.0), 7, with_tail=True)
    kw = dict(PARAMS, ce_weight=0.2, tail=tail, temperature=1.0 if tail == "bucket" else 2.0)
    targets = SparseTargets(ids, logprobs, tail_mass)
    fused = fused_distillation_loss(h, w, targets, labels, name, student_bias=b, chunk_size=5, **kw)
    fused.loss.backward()
    fused_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    sparse = sparse_distillation_loss(h @ w.T + b, ids, logprobs, labels, name, teacher_tail_mass=tail_mass, **kw)
    sparse.loss.backward()
    _check_same(fused, sparse)
    for what, g_fused, g_sparse in zip(("hidden", "weight", "bias"), fused_grads, _grads(h, w, b), strict=True):
        assert_close(g_fused, g_sparse, HIDDEN_GRAD_TOL if what == "hidden" else TOL, f"grad {what}")


def test_fused_module_equals_function(rng) -> None:
    h = rng.grid(3, 4, 8)
    w, _ = _head(rng, 19, 8, bias=False)
    teacher = TeacherHead(rng.randn(3, 4, 6), rng.randn(19, 6))
    labels = rng.labels((3, 4), 19)
    settings = dict(beta=0.2, temperature=2.0, ce_weight=0.4, chunk_size=5)
    module = FusedDistillationLoss("jsd", **settings)(h, w, teacher, labels)
    function = fused_distillation_loss(h, w, teacher, labels, "jsd", **settings)
    assert torch.equal(module.loss, function.loss)


@pytest.mark.parametrize("tail,temperature", [("bucket", 1.0), ("renormalize", 1.0), ("renormalize", 2.5)])
@pytest.mark.parametrize(
    "name,beta,alpha", [(n, 0.3, 0.1) for n in DIVERGENCES] + [("jsd", 0.0, 0.1), ("jsd", 1.0, 0.1)]
)
def test_sparse_with_all_ids_equals_dense(name, beta, alpha, tail, temperature, rng) -> None:
    """k == vocab: the tail bucket is empty (zero mass on both sides) and must not give NaN."""
    batch, seq, vocab = 2, 11, 17
    labels = rng.labels((batch, seq), vocab)
    teacher = rng.randn(batch, seq, vocab, scale=2.0)
    ids, logprobs, _ = rng.topk(teacher, vocab, with_tail=False)
    student = rng.randn(batch, seq, vocab).requires_grad_(True)
    kw = dict(beta=beta, alpha=alpha, temperature=temperature, ce_weight=0.3)
    sparse = sparse_distillation_loss(student, ids, logprobs, labels, name, tail=tail, **kw)
    sparse.loss.backward()
    sparse_grad, student.grad = student.grad, None
    dense = distillation_loss(student, logprobs.gather(-1, ids.argsort(-1)), labels, name, **kw)
    dense.loss.backward()
    assert torch.isfinite(sparse.loss) and bool(torch.isfinite(sparse_grad).all())
    _check_same(sparse, dense)
    assert_close(sparse_grad, student.grad, TOL, "grad")


# Not reverse_kl: KL(Q || P) is +inf where the teacher has no mass and the student has some.
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_sparse_zero_mass_slots_are_finite(name, rng) -> None:
    """A ``-inf`` log-prob (a padded slot, zero mass) contributes nothing and gives finite gradients."""
    student = rng.randn(3, 4, 10).requires_grad_(True)
    ids, logprobs, _ = rng.topk(rng.randn(3, 4, 10, scale=2.0), 5, with_tail=False)
    logprobs[..., -1] = -math.inf
    for tail in ("bucket", "renormalize"):
        out = sparse_distillation_loss(student, ids, logprobs, None, name, tail=tail, **PARAMS)
        out.loss.backward()
        assert torch.isfinite(out.loss) and bool(torch.isfinite(student.grad).all())
        ref = sparse_loss_ref(student, ids, logprobs, None, None, name, tail=tail, **PARAMS)
        assert_close(out.loss, ref.loss, TOL, tail)
        student.grad = None


@pytest.mark.parametrize("name,beta,alpha", [(n, 0.3, 0.1) for n in DIVERGENCES] + [("jsd", 0.5, 0.1)])
def test_sparse_bucket_is_a_lower_bound(name, beta, alpha, rng) -> None:
    """Data processing inequality: coarse-graining to top-k + tail cannot increase the divergence.

    In float64: a tail mass derived as ``1 - sum`` of float32 log-probs can be off by ~1e-7, which
    near k = vocab is a large relative error of a tiny tail (pass ``tail_mass`` in that case).
    """
    batch, seq, vocab = 4, 16, 200
    teacher = rng.randn(batch, seq, vocab, scale=2.0, dtype=torch.float64)
    student = rng.randn(batch, seq, vocab, scale=rng.choice([0.5, 1.0, 2.0]), dtype=torch.float64)
    kw = dict(beta=beta, alpha=alpha, reduction="none")
    dense = distillation_loss(student, teacher, None, name, **kw).loss
    for k in (1, 5, 50, vocab - 1):
        ids, logprobs, tail_mass = rng.topk(teacher, k, with_tail=rng.py.random() < 0.5, dtype=torch.float64)
        bucket = sparse_distillation_loss(student, ids, logprobs, None, name, teacher_tail_mass=tail_mass, **kw).loss
        assert bucket.dtype == torch.float64
        # k = vocab - 1 leaves one token in the tail: equality, up to float64 rounding.
        assert bool((bucket <= dense * (1 + 1e-9)).all()), f"k={k}: {float((bucket - dense).max()):.3g}"


def test_vocab_padding_rows(rng) -> None:
    """Heads of 40 (student) and 48 (teacher) rows sharing 37 tokens: only those 37 columns count."""
    batch, seq, hidden, shared = 2, 7, 8, 37
    h = rng.grid(batch, seq, hidden).requires_grad_(True)
    w, b = _head(rng, 40, hidden)
    teacher = TeacherHead(rng.randn(batch, seq, 6), rng.randn(48, 6), rng.randn(48))
    labels = rng.labels((batch, seq), shared)
    kw = dict(PARAMS, ce_weight=0.3, vocab_size=shared)
    fused = fused_distillation_loss(h, w, teacher, labels, "jsd", student_bias=b, chunk_size=4, **kw)
    fused.loss.backward()
    assert torch.count_nonzero(w.grad[shared:]) == 0 and torch.count_nonzero(b.grad[shared:]) == 0
    assert torch.count_nonzero(w.grad[:shared]) > 0
    fused_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    teacher_logits = teacher.hidden @ teacher.weight.T + teacher.bias
    dense = distillation_loss((h @ w.T + b)[..., :shared], teacher_logits[..., :shared], labels, "jsd", **kw)
    dense.loss.backward()
    _check_same(fused, dense)
    for what, g_fused, g_dense in zip(("hidden", "weight", "bias"), fused_grads, _grads(h, w, b), strict=True):
        assert_close(g_fused, g_dense, HIDDEN_GRAD_TOL if what == "hidden" else TOL, f"grad {what}")
    # The dense form on the padded logits with vocab_size gives the same thing.
    padded = distillation_loss(h @ w.T + b, teacher_logits, labels, "jsd", **kw)
    assert_close(padded.loss, dense.loss, TOL, "padded dense")


def test_tied_weights_accumulate_both_paths(rng) -> None:
    """One Parameter as embedding and head: the fused loss's head gradient adds to the embedding's."""
    vocab, hidden, batch, seq = 37, 12, 2, 9
    embedding = torch.nn.Parameter(rng.grid(vocab, hidden, scale=0.5))
    mix = rng.grid(hidden, hidden, scale=1 / math.sqrt(hidden))
    tokens = torch.randint(0, vocab, (batch, seq), generator=rng.torch)
    labels = rng.labels((batch, seq), vocab)
    teacher = TeacherHead(rng.randn(batch, seq, 8), rng.randn(vocab, 8, scale=2.0 / math.sqrt(8)))
    kw = dict(divergence="jsd", beta=0.3, ce_weight=0.3, temperature=1.5)

    def student_hidden(weight):
        return torch.tanh(weight[tokens] @ mix.to(weight.dtype)) * 2

    fused = fused_distillation_loss(student_hidden(embedding), embedding, teacher, labels, chunk_size=5, **kw)
    fused.loss.backward()
    fused_grad, embedding.grad = embedding.grad.clone(), None

    teacher_logits = teacher.hidden @ teacher.weight.T
    dense = distillation_loss(student_hidden(embedding) @ embedding.T, teacher_logits, labels, **kw)
    dense.loss.backward()
    assert_close(fused.loss, dense.loss, TOL, "tied loss")
    assert_close(fused_grad, embedding.grad, TOL, "tied grad vs dense")
    assert torch.count_nonzero(fused_grad[tokens.unique()]) > 0

    embedding64 = embedding.detach().double().requires_grad_(True)
    ref = dense_loss_ref(
        student_hidden(embedding64) @ embedding64.T, teacher_logits, labels, "jsd", beta=0.3, ce_weight=0.3,
        temperature=1.5,
    )  # fmt: skip
    ref.loss.backward()
    assert_close(fused_grad, embedding64.grad, TOL, "tied grad vs reference")


def test_head_size_mismatch_needs_vocab_size(rng) -> None:
    h, w = rng.randn(2, 3, 8), rng.randn(40, 8)
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        fused_distillation_loss(h, w, TeacherHead(rng.randn(2, 3, 6), rng.randn(48, 6)))
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        distillation_loss(rng.randn(2, 3, 40), rng.randn(2, 3, 48))
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        distillation_loss(rng.randn(2, 3, 40), rng.randn(2, 3, 48), vocab_size=41)


def test_labels_outside_vocab_raise(rng) -> None:
    labels = torch.tensor([[1, 2, -100], [3, 37, 0]])
    student, teacher = rng.randn(2, 3, 40), rng.randn(2, 3, 40)
    ids, logprobs, _ = rng.topk(teacher[..., :37], 4, with_tail=False)
    with pytest.raises(VocabularyMismatchError):
        distillation_loss(student, teacher, labels, vocab_size=37)
    with pytest.raises(VocabularyMismatchError):
        sparse_distillation_loss(student, ids, logprobs, labels, vocab_size=37)
    with pytest.raises(VocabularyMismatchError):
        fused_distillation_loss(
            rng.randn(2, 3, 8), rng.randn(40, 8), SparseTargets(ids, logprobs), labels, vocab_size=37
        )
    with pytest.raises(VocabularyMismatchError):
        distillation_loss(student, teacher, torch.tensor([[1, 2, -5], [3, 4, 0]]))


def test_sparse_target_checks(rng) -> None:
    student = rng.randn(2, 3, 20)
    ids, logprobs, _ = rng.topk(rng.randn(2, 3, 20, scale=2.0), 4, with_tail=False)
    for bad_id in (20, -1):
        bad = ids.clone()
        bad[1, 2, 0] = bad_id
        with pytest.raises(VocabularyMismatchError):
            sparse_distillation_loss(student, bad, logprobs)
    duplicated = ids.clone()
    duplicated[0, 1, 1] = duplicated[0, 1, 3]
    with pytest.raises(ValueError, match="repeat"):
        sparse_distillation_loss(student, duplicated, logprobs)
    with pytest.raises(ValueError, match="log-prob"):
        sparse_distillation_loss(student, ids, rng.randn(2, 3, 4, scale=3.0) + 2.0)
    with pytest.raises(ValueError, match="log-prob"):
        fused_distillation_loss(rng.randn(2, 3, 5), rng.randn(20, 5), SparseTargets(ids, logprobs + 1.0))
    # Masked positions are neither checked nor used: padding there is fine.
    labels = torch.tensor([[1, -100, 2], [-100, 4, 5]])
    padded_ids, padded_logprobs = ids.clone(), logprobs.clone()
    padded_ids[labels == -100] = -1
    padded_logprobs[labels == -100] = 7.0
    a = sparse_distillation_loss(student, padded_ids, padded_logprobs, labels)
    b = sparse_distillation_loss(student, ids, logprobs, labels)
    assert torch.equal(a.loss, b.loss)


def test_an_unknown_divergence_name_raises_instead_of_falling_through() -> None:
    """The dispatch table has no default: a name outside it raises, even if it got past the constructor."""
    divergence = Divergence("jsd")
    object.__setattr__(divergence, "name", "not_a_divergence")  # what a frozen dataclass cannot stop
    logprobs = torch.log_softmax(torch.randn(2, 5), dim=-1)
    with pytest.raises(ValueError, match="Unknown divergence 'not_a_divergence'"):
        divergence(logprobs, logprobs)
    with pytest.raises(ValueError, match="Unknown divergence 'not_a_divergence'"):
        divergence.value_and_grad(logprobs.clone(), logprobs.clone(), logprobs.exp(), logprobs.exp())
    aliases = {"kl": "forward_kl", "fkl": "forward_kl", "rkl": "reverse_kl", "generalized_jsd": "jsd",
               "skl": "skew_kl", "srkl": "skew_reverse_kl", "total_variation": "tvd"}  # fmt: skip
    assert {alias: Divergence(alias).name for alias in aliases} == aliases
    assert {Divergence(name).name for name in DIVERGENCES} == set(DIVERGENCES)


def test_argument_checks(rng) -> None:
    student, teacher = rng.randn(2, 3, 10), rng.randn(2, 3, 10)
    ids, logprobs, _ = rng.topk(teacher, 4, with_tail=False)
    h, w = rng.randn(2, 3, 5), rng.randn(10, 5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student, teacher, None, ce_weight=0.5)
    with pytest.raises(ValueError, match="labels"):
        sparse_distillation_loss(student, ids, logprobs, None, ce_weight=0.5)
    with pytest.raises(ValueError, match="labels"):
        fused_distillation_loss(h, w, TeacherHead(h, w), None, ce_weight=0.5)
    with pytest.raises(ValueError) as unknown:
        distillation_loss(student, teacher, divergence="kl_div")
    assert all(name in str(unknown.value) for name in DIVERGENCES)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            distillation_loss(student, teacher, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            fused_distillation_loss(h, w, TeacherHead(h, w), beta=beta)
    for alpha in (-0.1, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            sparse_distillation_loss(student, ids, logprobs, divergence="skew_kl", alpha=alpha)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fused_distillation_loss(h, w, SparseTargets(ids, logprobs), reduction="none")


def test_dense_teacher_logits_get_no_grad(rng) -> None:
    student = rng.randn(2, 3, 10).requires_grad_(True)
    teacher = rng.randn(2, 3, 10).requires_grad_(True)
    distillation_loss(student, teacher, rng.labels((2, 3), 10), ce_weight=0.1).loss.backward()
    assert teacher.grad is None and student.grad is not None


def _sparse_teacher(rng: Rng):
    logprobs, ids = torch.log_softmax(rng.randn(2, 3, 10), -1).topk(4, dim=-1)
    tail_mass = 1 - logprobs.exp().sum(-1)
    return ids, logprobs.requires_grad_(True), tail_mass.requires_grad_(True)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_teacher_tensors_get_no_grad(tail, rng) -> None:
    """Teachers are frozen (targets.py): the sparse form must not backpropagate into its targets."""
    student = rng.randn(2, 3, 10).requires_grad_(True)
    ids, logprobs, tail_mass = _sparse_teacher(rng)
    out = sparse_distillation_loss(
        student, ids, logprobs, rng.labels((2, 3), 10), teacher_tail_mass=tail_mass, tail=tail
    )
    out.loss.backward()
    assert student.grad is not None
    assert logprobs.grad is None, "gradient flowed into teacher_topk_logprobs"
    assert tail_mass.grad is None, "gradient flowed into teacher_tail_mass"


def test_fused_teacher_tensors_get_no_grad(rng) -> None:
    labels = rng.labels((2, 3), 10)
    h = rng.randn(2, 3, 5).requires_grad_(True)
    w, b = rng.randn(10, 5).requires_grad_(True), rng.randn(10).requires_grad_(True)
    head = TeacherHead(*(t.requires_grad_(True) for t in (rng.randn(2, 3, 4), rng.randn(10, 4), rng.randn(10))))
    fused_distillation_loss(h, w, head, labels, student_bias=b).loss.backward()
    assert head.hidden.grad is None and head.weight.grad is None and head.bias.grad is None
    ids, logprobs, tail_mass = _sparse_teacher(rng)
    fused_distillation_loss(h, w, SparseTargets(ids, logprobs, tail_mass), labels).loss.backward()
    assert logprobs.grad is None and tail_mass.grad is None and h.grad is not None


@pytest.mark.parametrize("form", ["dense", "bucket", "renormalize"])
def test_output_fields_match_reference(form, rng) -> None:
    batch, seq, vocab = 3, 23, 12
    labels = rng.labels((batch, seq), vocab, masked=0.4)
    teacher = rng.randn(batch, seq, vocab, scale=2.0)
    # A student that often agrees with the teacher, so top1_agreement is neither 0 nor 1.
    student = teacher + rng.randn(batch, seq, vocab, scale=1.5)
    kw = dict(beta=0.3, ce_weight=0.3, kd_weight=0.7)
    if form == "dense":
        out = distillation_loss(student, teacher, labels, "jsd", **kw)
        ref = dense_loss_ref(student, teacher, labels, "jsd", **kw)
    else:
        ids, logprobs, _ = rng.topk(teacher, 5, with_tail=False)
        out = sparse_distillation_loss(student, ids, logprobs, labels, "jsd", tail=form, **kw)
        ref = sparse_loss_ref(student, ids, logprobs, None, labels, "jsd", tail=form, **kw)
    assert isinstance(out, DistillationOutput)
    assert out.num_tokens == ref.num_tokens == int((labels != -100).sum())
    for field in ("loss", "kd_loss", "ce_loss"):
        assert_close(getattr(out, field), getattr(ref, field), TOL, field)
    agreeing = (student.argmax(-1) == teacher.argmax(-1))[labels != -100].double().mean()
    assert_close(out.top1_agreement, agreeing, 1e-6, "top1_agreement")
    assert_close(ref.top1_agreement, agreeing, 1e-12, "reference top1_agreement")
    for field in ("kd_loss", "ce_loss", "top1_agreement"):
        assert not getattr(out, field).requires_grad
    no_labels = distillation_loss(student, teacher, None, "jsd", beta=0.3)
    assert no_labels.num_tokens == batch * seq and math.isnan(float(no_labels.ce_loss))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_entropy_matches_float64(temperature, rng) -> None:
    """The logged teacher entropy is the mean of -sum p log p of the tempered teacher over labelled tokens."""
    batch, seq, _, vocab = SHAPE
    labels = rng.labels((batch, seq), vocab)
    student, teacher = rng.randn(batch, seq, vocab), rng.randn(batch, seq, vocab, scale=3.0)
    out = distillation_loss(student, teacher, labels, "jsd", temperature=temperature)
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    per_token = -(p * p.log()).sum(-1)
    valid = labels != -100
    assert_close(out.teacher_entropy, per_token[valid].mean(), TOL, "teacher_entropy")

"""Every divergence in every form against the independent float64 reference, values and gradients.

Inputs are fresh random draws on every run; each test prints its seed (shown on failure) and
``DISTILL_TEST_SEED=<seed>`` replays it. fp32 inputs must match the reference to a relative error
below 1e-5 (``max |a - b| / max |ref|``), for the loss and for every gradient.
"""

from __future__ import annotations

import math

import pytest
import reference
import torch
from reference import Rng, assert_close, dense_loss_ref, head_logits_ref, leaves64, sparse_loss_ref

from distill.losses import (
    DIVERGENCES,
    Divergence,
    OutputHead,
    SparseTargets,
    TeacherHead,
    distillation_loss,
    fused_distillation_loss,
    sparse_distillation_loss,
)

TOL = 1e-5
# The fused loss's hidden-state gradient is ``G @ W`` with ``G`` the gradient of the logits; its rows
# nearly cancel (sum of G over the vocabulary is 0), and for the reverse-KL family the float32
# autograd of ``q * (log q - log p)`` gives G a common relative error (the ``+1`` terms cancel), so
# the contraction amplifies G's float32 error to up to ~2e-5 of the result, even with the matmul
# done in float64. Every other quantity is held to TOL.
HIDDEN_GRAD_TOL = 5e-5
# (name, beta, alpha): every divergence, with the JSD's and the skews' special values.
SPECS = (
    [(name, 0.5, 0.1) for name in ("forward_kl", "reverse_kl", "tvd")]
    + [("jsd", beta, 0.1) for beta in (0.0, 0.3, 0.5, 1.0)]
    + [(name, 0.5, alpha) for name in ("skew_kl", "skew_reverse_kl") for alpha in (0.0, 0.1)]
)
SPEC_IDS = [f"{n}-b{b}" if n == "jsd" else f"{n}-a{a}" if n.startswith("skew") else n for n, b, a in SPECS]
# (batch, seq, hidden, vocab)
SHAPES = [(3, 47, 31, 123), (1, 1, 8, 5), (2, 17, 16, 1000)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
def test_output_head_logits_match_the_reference(rng: Rng, bias: bool, softcap: float | None) -> None:
    """The one head -> logits function: plain, into a float32 buffer, over leading rows, and a teacher's."""
    hidden, weight, head_bias = (None if t is None else t.detach() for t in rng.head((2, 7, 16, 13), 4.0, bias))
    head = OutputHead(weight, head_bias, softcap)
    expected = head_logits_ref(hidden, weight, head_bias, softcap)
    assert_close(head.logits(hidden), expected, TOL, "logits")
    assert_close(TeacherHead(hidden, weight, head_bias, softcap).logits(), expected, TOL, "teacher logits")
    flat, vocab = hidden.reshape(-1, 16), 11
    buffer = torch.full((flat.shape[0], vocab), math.nan)
    got = head.logits(flat, vocab, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()  # written in place: no [n, V] tensor allocated
    assert_close(got, head_logits_ref(flat, weight, head_bias, softcap, vocab), TOL, "into a buffer")
    half = OutputHead(weight.bfloat16(), None if head_bias is None else head_bias.bfloat16(), softcap)
    upcast = half.logits(flat.bfloat16(), vocab, out=torch.empty(flat.shape[0], vocab))  # bf16 matmul, fp32 out
    assert upcast.dtype == torch.float32
    assert_close(upcast, head_logits_ref(flat, weight, head_bias, softcap, vocab), 3e-2, "bf16 head")


def test_the_reference_covers_every_divergence_the_package_ships() -> None:
    """A divergence added to ``distill.losses`` fails here until ``tests/reference.py`` and :data:`SPECS` cover it."""
    assert {name for name, _, _ in SPECS} == set(DIVERGENCES)
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    student = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    for name in DIVERGENCES:
        assert name in reference.DIVERGENCES
        expected = reference.divergence_ref(name, teacher, student, beta=0.3, alpha=0.1)  # raises on a missing name
        got = Divergence(name, beta=0.3, alpha=0.1)(student.log(), teacher.log())
        assert_close(got, expected, 1e-12, name)


# Below this relative gap between p and q somewhere, the TVD's gradient sign may legitimately differ
# between float32 and float64: such draws are redrawn.
TVD_GAP = 1e-5
# Logits of a few nats: the student's near 1 (float32 log-softmax errors grow with the logits), the
# teacher's larger so the two distributions differ clearly.
STUDENT_SCALE, TEACHER_SCALE = 1.0, 2.0
# float32 log-probabilities carry an absolute error of ~1e-7 nats per token (averaging out over
# tokens), so a mean far below 1 cannot be held to a 1e-5 relative error: such draws are redrawn too.
MIN_VALUE = 0.05

spec_axis = pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
shape_axis = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)


def _common(rng: Rng, leading: tuple[int, ...], vocab: int) -> dict:
    """Random weights, labels (sometimes none), reduction, and sometimes a smaller shared vocabulary."""
    ce_weight = rng.choice([0.0, 0.3])
    vocab_size = rng.choice([None, None, vocab - 2]) if vocab > 3 else None
    used = vocab_size or vocab
    labels = None if ce_weight == 0 and rng.py.random() < 0.25 else rng.labels(leading, used)
    reduction = rng.choice(["mean", "mean", "sum"])
    kd_weight = rng.choice([1.0, 0.7])
    return dict(kd_weight=kd_weight, ce_weight=ce_weight, vocab_size=vocab_size, labels=labels, reduction=reduction)


def _well_conditioned(name: str, ref) -> bool:
    """Whether the draw behind ``ref`` can be compared at a 1e-5 relative error in float32."""
    if name == "tvd" and ref.min_gap <= TVD_GAP:
        return False
    floor = MIN_VALUE / math.sqrt(max(ref.num_tokens, 1))
    return float(ref.kd_loss) >= floor and not float(ref.ce_loss) < floor


def _check_output(out, ref, what: str) -> None:
    assert out.num_tokens == ref.num_tokens, what
    assert_close(out.loss, ref.loss, TOL, f"{what} loss")
    assert_close(out.kd_loss, ref.kd_loss, TOL, f"{what} kd_loss")
    if math.isnan(float(ref.ce_loss)):
        assert math.isnan(float(out.ce_loss)), what
    else:
        assert_close(out.ce_loss, ref.ce_loss, TOL, f"{what} ce_loss")


def _agreeing_tokens(out) -> int:
    return round(float(out.top1_agreement) * out.num_tokens)


def _draw(name: str, make):
    """``make()`` -> ``(inputs, ref)``, redrawn until the draw is well conditioned."""
    for _ in range(100):
        inputs, ref = make()
        if _well_conditioned(name, ref):
            return inputs, ref
    raise AssertionError("could not draw well-conditioned inputs")


def _draw_dense(rng: Rng, shape, spec, temperature: float):
    batch, seq, _, vocab = shape
    name, beta, alpha = spec

    def make():
        student = rng.randn(batch, seq, vocab, scale=STUDENT_SCALE)
        teacher = rng.randn(batch, seq, vocab, scale=TEACHER_SCALE)
        kw = dict(beta=beta, alpha=alpha, temperature=temperature, **_common(rng, (batch, seq), vocab))
        return (student, teacher, kw), dense_loss_ref(student, teacher, name=name, **kw)

    return _draw(name, make)[0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@shape_axis
@spec_axis
def test_dense_matches_reference(spec, shape, temperature, rng) -> None:
    student, teacher, kw = _draw_dense(rng, shape, spec, temperature)
    student.requires_grad_(True)
    out = distillation_loss(student, teacher, divergence=spec[0], **kw)
    out.loss.backward()
    student64 = student.detach().double().requires_grad_(True)
    ref = dense_loss_ref(student64, teacher, name=spec[0], **kw)
    ref.loss.backward()
    _check_output(out, ref, "dense")
    assert _agreeing_tokens(out) == _agreeing_tokens(ref)
    assert_close(student.grad, student64.grad, TOL, "dense grad")


def _sparse_teacher(rng: Rng, leading, vocab: int, tail: str):
    """Top-k targets of a random teacher: k from 1 (2 when renormalizing) to 64, tail mass given or not.

    A given tail mass is off from ``1 - sum`` by up to 20%, as if the log-probs had been stored
    lossily: the loss must use the given value.
    """
    teacher = rng.randn(*leading, vocab, scale=TEACHER_SCALE)
    k = rng.py.randint(1 if tail == "bucket" else 2, min(vocab - 1, 64))
    ids, logprobs, tail_mass = rng.topk(teacher, k, with_tail=rng.py.random() < 0.5)
    if tail_mass is not None:
        tail_mass = (tail_mass * (0.8 + 0.4 * torch.rand(tail_mass.shape, generator=rng.torch))).clamp(max=1)
    return ids, logprobs, tail_mass


def _draw_sparse(rng: Rng, shape, spec, tail: str, temperature: float):
    batch, seq, _, vocab = shape
    name, beta, alpha = spec

    def make():
        student = rng.randn(batch, seq, vocab, scale=STUDENT_SCALE)
        kw = dict(beta=beta, alpha=alpha, temperature=temperature, tail=tail, **_common(rng, (batch, seq), vocab))
        ids, logprobs, tail_mass = _sparse_teacher(rng, (batch, seq), kw["vocab_size"] or vocab, tail)
        return (student, ids, logprobs, tail_mass, kw), sparse_loss_ref(
            student, ids, logprobs, tail_mass, name=name, **kw
        )

    return _draw(name, make)[0]


TAILS = [("bucket", 1.0), ("renormalize", 1.0), ("renormalize", 2.5)]


@pytest.mark.parametrize("tail,temperature", TAILS)
@shape_axis
@spec_axis
def test_sparse_matches_reference(spec, shape, tail, temperature, rng) -> None:
    student, ids, logprobs, tail_mass, kw = _draw_sparse(rng, shape, spec, tail, temperature)
    student.requires_grad_(True)
    out = sparse_distillation_loss(student, ids, logprobs, divergence=spec[0], teacher_tail_mass=tail_mass, **kw)
    out.loss.backward()
    student64 = student.detach().double().requires_grad_(True)
    ref = sparse_loss_ref(student64, ids, logprobs, tail_mass, name=spec[0], **kw)
    ref.loss.backward()
    _check_output(out, ref, f"sparse {tail}")
    assert _agreeing_tokens(out) == _agreeing_tokens(ref)
    assert_close(student.grad, student64.grad, TOL, f"sparse {tail} grad")


def test_sparse_bucket_needs_temperature_one(rng) -> None:
    student = rng.randn(2, 3, 11)
    ids, logprobs, _ = rng.topk(rng.randn(2, 3, 11), 4, with_tail=False)
    with pytest.raises(ValueError, match="temperature"):
        sparse_distillation_loss(student, ids, logprobs, tail="bucket", temperature=2.0)
    hidden, weight = rng.randn(2, 3, 5), rng.randn(11, 5)
    with pytest.raises(ValueError, match="temperature"):
        fused_distillation_loss(hidden, weight, SparseTargets(ids, logprobs), tail="bucket", temperature=0.5)


# Fused variants: teacher (a dense head, or top-k targets with a tail mode), chunk size (1, 7, 64, more than
# the tokens), student bias, softcaps (student, teacher), temperature. The token counts (141, 34 before
# masking) are not multiples of 7 or 64.
FUSED = [
    dict(target="head", chunk_size=1, bias=True, student_softcap=None, teacher_softcap=None, temperature=1.0),
    dict(target="head", chunk_size=7, bias=False, student_softcap=4.0, teacher_softcap=3.0, temperature=2.5),
    dict(target="head", chunk_size=64, bias=True, student_softcap=3.0, teacher_softcap=None, temperature=1.0),
    dict(target="head", chunk_size=4096, bias=False, student_softcap=None, teacher_softcap=5.0, temperature=2.5),
    dict(target="bucket", chunk_size=1, bias=True, student_softcap=None, temperature=1.0),
    dict(target="renormalize", chunk_size=7, bias=False, student_softcap=4.0, temperature=2.5),
    dict(target="bucket", chunk_size=64, bias=False, student_softcap=3.0, temperature=1.0),
    dict(target="renormalize", chunk_size=4096, bias=True, student_softcap=None, temperature=1.0),
]


def _check_fused_grads(student, student64) -> None:
    for name, t, t64 in zip(("hidden", "weight", "bias"), student, student64, strict=True):
        if t is not None:
            assert t.grad is not None, name
            tol = HIDDEN_GRAD_TOL if name == "hidden" else TOL
            assert_close(t.grad, t64.grad, tol, f"fused grad {name}")


@pytest.mark.parametrize("variant", FUSED, ids=lambda v: f"{v['target']}-chunk{v['chunk_size']}")
@shape_axis
@spec_axis
def test_fused_matches_reference(spec, shape, variant, rng) -> None:
    name, beta, alpha = spec
    batch, seq, hidden, vocab = shape
    v = dict(variant)
    target, chunk_size, softcap = v.pop("target"), v.pop("chunk_size"), v.pop("student_softcap")
    bias, teacher_softcap = v.pop("bias"), v.pop("teacher_softcap", None)

    def make():
        student = rng.head(shape, STUDENT_SCALE, bias)
        student64 = leaves64(*student)
        student_logits = head_logits_ref(*student64, softcap)
        kw = dict(beta=beta, alpha=alpha, **v, **_common(rng, (batch, seq), vocab))
        if target == "head":
            h, w, b = rng.head((batch, seq, hidden + 3, vocab), TEACHER_SCALE, rng.py.random() < 0.5)
            teacher = TeacherHead(h.detach(), w.detach(), None if b is None else b.detach(), teacher_softcap)
            teacher_logits = head_logits_ref(teacher.hidden, teacher.weight, teacher.bias, teacher_softcap)
            ref = dense_loss_ref(student_logits, teacher_logits, name=name, **kw)
        else:
            teacher = SparseTargets(*_sparse_teacher(rng, (batch, seq), kw["vocab_size"] or vocab, target))
            targets = (teacher.topk_ids, teacher.topk_logprobs, teacher.tail_mass)
            ref = sparse_loss_ref(student_logits, *targets, name=name, tail=target, **kw)
            kw["tail"] = target
        return (student, student64, teacher, kw), ref

    (student, student64, teacher, kw), ref = _draw(name, make)
    out = fused_distillation_loss(
        *student[:2], teacher, divergence=name, student_bias=student[2], student_softcap=softcap,
        chunk_size=chunk_size, **kw,
    )  # fmt: skip
    out.loss.backward()
    ref.loss.backward()
    _check_output(out, ref, f"fused {target}")
    _check_fused_grads(student, student64)


FORMS = ["dense", "sparse-bucket", "sparse-renormalize", "fused-head", "fused-sparse"]


def _run_form(form: str, rng: Rng, labels, shape=(2, 5, 6, 11), **kw):
    """The loss of one form on fresh inputs; returns (output, the student leaves)."""
    batch, seq, hidden, vocab = shape
    teacher = rng.randn(batch, seq, vocab, scale=TEACHER_SCALE)
    ids, logprobs, _ = rng.topk(teacher, 4, with_tail=False)
    if form == "dense" or form.startswith("sparse"):
        student = rng.randn(batch, seq, vocab).requires_grad_(True)
        if form == "dense":
            return distillation_loss(student, teacher, labels, **kw), [student]
        tail = form.split("-")[1]
        return sparse_distillation_loss(student, ids, logprobs, labels, tail=tail, **kw), [student]
    h, w, b = rng.head(shape, STUDENT_SCALE, bias=True)
    target = (
        TeacherHead(rng.randn(batch, seq, 7), rng.randn(vocab, 7))
        if form == "fused-head"
        else SparseTargets(ids, logprobs)
    )
    return fused_distillation_loss(h, w, target, labels, student_bias=b, chunk_size=3, **kw), [h, w, b]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl", "tvd"])
def test_all_masked_is_zero_with_zero_grads(form, name, rng) -> None:
    labels = torch.full((2, 5), -100)
    out, leaves = _run_form(form, rng, labels, divergence=name, ce_weight=0.3)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    assert out.kd_loss.item() == 0.0 and out.ce_loss.item() == 0.0 and out.top1_agreement.item() == 0.0
    out.loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.count_nonzero(leaf.grad) == 0


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("form", ["dense", "sparse-bucket", "sparse-renormalize"])
@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_kl"])
def test_reductions_match_reference(form, reduction, name, rng) -> None:
    shape = (3, 7, 0, 29)
    labels = rng.labels(shape[:2], shape[-1])
    kw = dict(divergence=name, beta=0.3, alpha=0.1, ce_weight=0.3, kd_weight=0.7, reduction=reduction)
    student = rng.randn(*shape[:2], shape[-1]).requires_grad_(True)
    teacher = rng.randn(*shape[:2], shape[-1], scale=TEACHER_SCALE)
    ids, logprobs, tail_mass = rng.topk(teacher, 9, with_tail=True)
    student64 = student.detach().double().requires_grad_(True)
    ref_kw = dict(name=name, beta=0.3, alpha=0.1, ce_weight=0.3, kd_weight=0.7, reduction=reduction)
    if form == "dense":
        out = distillation_loss(student, teacher, labels, **kw)
        ref = dense_loss_ref(student64, teacher, labels, **ref_kw)
    else:
        tail = form.split("-")[1]
        out = sparse_distillation_loss(student, ids, logprobs, labels, teacher_tail_mass=tail_mass, tail=tail, **kw)
        ref = sparse_loss_ref(student64, ids, logprobs, tail_mass, labels, tail=tail, **ref_kw)
    assert out.loss.shape == ref.loss.shape
    assert_close(out.loss, ref.loss, TOL, f"{form} {reduction}")
    if reduction == "none":
        assert torch.all(out.loss[labels == -100] == 0)
    upstream = rng.randn(*out.loss.shape)
    (out.loss * upstream).sum().backward()
    (ref.loss * upstream.double()).sum().backward()
    assert_close(student.grad, student64.grad, TOL, f"{form} {reduction} grad")


@pytest.mark.parametrize("target", ["head", "sparse"])
@pytest.mark.parametrize("name,beta,alpha", [("jsd", 0.3, 0.1), ("skew_reverse_kl", 0.5, 0.1)])
def test_fused_float64_gradcheck(name, beta, alpha, target, rng) -> None:
    batch, seq, hidden, vocab = 2, 3, 4, 7
    h = rng.randn(batch, seq, hidden, dtype=torch.float64).requires_grad_(True)
    w = rng.randn(vocab, hidden, dtype=torch.float64).requires_grad_(True)
    b = rng.randn(vocab, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([[1, -100, 4], [0, 6, 2]])
    teacher_logits = rng.randn(batch, seq, vocab, scale=TEACHER_SCALE, dtype=torch.float64)
    if target == "head":
        teacher = TeacherHead(rng.randn(batch, seq, 5, dtype=torch.float64), rng.randn(vocab, 5, dtype=torch.float64))
    else:
        logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(4, dim=-1)
        teacher = SparseTargets(ids, logprobs)
    kw = dict(beta=beta, alpha=alpha, ce_weight=0.3, temperature=1.0 if target == "sparse" else 1.7)

    def loss(hidden, weight, bias):
        return fused_distillation_loss(
            hidden, weight, teacher, labels, name, student_bias=bias, student_softcap=3.0, chunk_size=2, **kw
        ).loss

    assert torch.autograd.gradcheck(loss, (h, w, b))
    # float64 in, float64 math: the reference agrees to rounding.
    out = loss(h, w, b)
    student_logits = head_logits_ref(h, w, b, softcap=3.0)
    if target == "head":
        ref = dense_loss_ref(student_logits, teacher.hidden @ teacher.weight.T, labels, name, **kw)
    else:
        ref = sparse_loss_ref(student_logits, teacher.topk_ids, teacher.topk_logprobs, None, labels, name, **kw)
    assert out.dtype == torch.float64
    assert_close(out, ref.loss, 1e-12, "float64 fused")


@pytest.mark.parametrize("target", ["head", "sparse"])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
def test_fused_bf16_close_to_fp32(name, target, rng) -> None:
    shape = (2, 24, 32, 301)
    labels = rng.labels(shape[:2], shape[-1])
    h, w, b = (t.detach().bfloat16() for t in rng.head(shape, STUDENT_SCALE, bias=True))
    teacher_logits = rng.randn(*shape[:2], shape[-1], scale=TEACHER_SCALE)
    ids, logprobs, _ = rng.topk(teacher_logits, 20, with_tail=False)
    head = TeacherHead(rng.randn(*shape[:2], 16).bfloat16(), rng.randn(shape[-1], 16, scale=0.5).bfloat16())
    outputs, grads = [], []
    for dtype in (torch.bfloat16, torch.float32):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (h, w, b)]
        teacher = (
            TeacherHead(head.hidden.to(dtype), head.weight.to(dtype))
            if target == "head"
            else SparseTargets(ids, logprobs)
        )
        out = fused_distillation_loss(
            leaves[0], leaves[1], teacher, labels, name, student_bias=leaves[2], ce_weight=0.3, chunk_size=16
        )
        out.loss.backward()
        outputs.append(out)
        grads.append([leaf.grad for leaf in leaves])
    low, high = outputs
    assert torch.isfinite(low.loss)
    assert_close(low.loss, high.loss, 1e-2, "bf16 loss")
    assert_close(low.kd_loss, high.kd_loss, 1e-2, "bf16 kd_loss")
    for g_low, g_high in zip(*grads, strict=True):
        assert g_low.dtype == torch.bfloat16 and bool(torch.isfinite(g_low).all())
        assert_close(g_low, g_high, 5e-2, "bf16 grad")

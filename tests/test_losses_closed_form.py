"""The fused loss's closed-form chunk gradients against its autograd path, its buffers, and evaluation.

``gradient="closed_form"`` (the default) must give what ``gradient="autograd"`` (autograd through the
per-token body every form shares) gives, to 1e-6 relative in float32, for every divergence name the
package exports and every teacher form. Both are held to the float64 reference elsewhere
(``test_losses_reference.py``); this file pins the two paths to each other far more tightly.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import Rng, assert_close, record_margin, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from distill.losses import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    DistillationOutput,
    Divergence,
    SparseTargets,
    TeacherHead,
    fused_distillation_loss,
)

TOL = 1e-6
# A chunk's per-row values (kd, teacher entropy) are float32 sums over the vocabulary, rounded differently by the
# closed form and autograd: over 2,000 seeds x 18 cases (V=211) the worst kd was 1.22e-6 relative (and the
# 1e-6 once used here failed at seed 7287931163218069530); dLoss/d(logits) was at most 6.7e-7, under TOL.
VALUE_TOL = 3e-6
# The parameter gradients are float32 contractions of G = dLoss/d(logits) whose terms cancel: G @ W
# over the vocabulary (each row of G sums to 0) for the hidden states, G^T @ h and sum(G) over tokens
# for the head. That magnifies the float32 rounding of G (~1e-7 per entry, different in the two paths)
# to ~1e-5 of the result (as in test_losses_reference's float64 comparison); G itself, what the closed
# form computes, is held to TOL in test_chunk_logit_gradients_agree.
CONTRACTION_TOL = {"hidden": 3e-5, "weight": 1e-5, "bias": 1e-5}
SHAPES = [(3, 47, 31, 123), (1, 1, 8, 5), (2, 17, 16, 1000)]  # batch, seq, hidden, vocab
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
IGNORE = -1  # a non-default ignore_index, to check it reaches the closed form


def _labels(rng: Rng, leading: tuple[int, ...], vocab: int) -> torch.Tensor:
    labels = rng.labels(leading, vocab)
    return torch.where(labels == -100, torch.full_like(labels, IGNORE), labels)


def _as_float64(teacher):
    if isinstance(teacher, TeacherHead):
        bias = None if teacher.bias is None else teacher.bias.double()
        return TeacherHead(teacher.hidden.double(), teacher.weight.double(), bias, teacher.softcap)
    tail = None if teacher.tail_mass is None else teacher.tail_mass.double()
    return SparseTargets(teacher.topk_ids, teacher.topk_logprobs.double(), tail, teacher.estimate)


def _both_paths(h, w, b, teacher, labels, name, **kw) -> list[tuple[DistillationOutput, list[torch.Tensor]]]:
    """Loss and (hidden, weight, bias) gradients from the closed form, autograd, and autograd in float64."""
    results = []
    for gradient, dtype in (("closed_form", torch.float32), ("autograd", torch.float32), ("autograd", torch.float64)):
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in (h, w, b)]
        out = fused_distillation_loss(
            leaves[0], leaves[1], teacher if dtype == torch.float32 else _as_float64(teacher), labels, name,
            student_bias=leaves[2], ignore_index=IGNORE, gradient=gradient, **kw,
        )  # fmt: skip
        out.loss.backward()
        results.append((out, [leaf.grad for leaf in leaves]))
    return results


def _assert_close_or_closer(closed, auto, exact, tol: float, what: str) -> None:
    """Closed form within ``tol`` of autograd; or, on a rare ill-conditioned draw (a tiny loss, gradients
    whose float32 contraction cancels), no further from the float64 result than autograd is."""
    error = rel_err(closed, auto)
    if error < tol:
        record_margin(what, error, tol)
        return
    closed_error, auto_error = rel_err(closed, exact), rel_err(auto, exact)
    message = f"{what}: closed form {closed_error:.3g}, autograd {auto_error:.3g} from float64"
    # Below the contraction tolerance (3e-5, the largest above) both are float32 rounding: a CE of ~1e-6 relative
    # error on one 8-token draw; a TVD bias gradient (sum over tokens of sign-based terms that flip at near-ties)
    # at 1.9e-5 vs autograd's 7.5e-6 on a 34-token, 1,000-word draw. A wrong gradient is off by far more.
    allowed = max(2 * auto_error, max(CONTRACTION_TOL.values()))
    record_margin(f"{what} (vs float64)", closed_error, allowed)
    assert closed_error <= allowed, message


def _assert_paths_agree(results) -> None:
    (closed, closed_grads), (auto, auto_grads), (exact, exact_grads) = results
    assert closed.num_tokens == auto.num_tokens
    assert_close(closed.top1_agreement, auto.top1_agreement, TOL, "top1_agreement")
    for field in ("loss", "kd_loss", "ce_loss", "teacher_entropy"):
        _assert_close_or_closer(getattr(closed, field), getattr(auto, field), getattr(exact, field), TOL, field)
    names = ("hidden", "weight", "bias")
    for what, g_closed, g_auto, g_exact in zip(names, closed_grads, auto_grads, exact_grads, strict=True):
        _assert_close_or_closer(g_closed, g_auto, g_exact, CONTRACTION_TOL[what], f"grad {what}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_closed_form_equals_autograd_dense_teacher(name, shape, rng) -> None:
    batch, seq, hidden, vocab = shape
    h, w, b = rng.head(shape, scale=2.0, bias=True)
    teacher = TeacherHead(rng.randn(batch, seq, 9), rng.randn(vocab, 9, scale=0.8), rng.randn(vocab), softcap=6.0)
    kw = dict(
        beta=rng.choice([0.0, 0.3, 0.5, 1.0]), alpha=rng.choice([0.0, 0.1]), temperature=rng.choice([1.0, 1.7]),
        ce_weight=rng.choice([0.0, 0.3]), kd_weight=0.8, student_softcap=rng.choice([None, 5.0]),
        chunk_size=rng.choice([1, 5, 16]), reduction=rng.choice(["mean", "sum"]),
    )  # fmt: skip
    _assert_paths_agree(_both_paths(h, w, b, teacher, _labels(rng, (batch, seq), vocab), name, **kw))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("shape", SHAPES[::2], ids=SHAPE_IDS[::2])
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_closed_form_equals_autograd_sparse_teacher(name, shape, tail, rng) -> None:
    batch, seq, hidden, vocab = shape
    h, w, b = rng.head(shape, scale=2.0, bias=True)
    k = rng.choice([1, 7, vocab - 1, vocab])
    with_tail = k < vocab and rng.py.random() < 0.5
    ids, logprobs, tail_mass = rng.topk(rng.randn(batch, seq, vocab, scale=2.0), k, with_tail=with_tail)
    kw = dict(
        beta=rng.choice([0.0, 0.3, 1.0]), alpha=rng.choice([0.0, 0.1]), ce_weight=rng.choice([0.0, 0.3]),
        temperature=1.0 if tail == "bucket" else rng.choice([1.0, 2.5]), tail=tail, chunk_size=rng.choice([3, 64]),
        student_softcap=rng.choice([None, 4.0]),
    )  # fmt: skip
    reverse = Divergence(name, beta=kw["beta"], alpha=kw["alpha"])
    is_reverse_kl = reverse.name == "reverse_kl" or (reverse.name, reverse.beta) == ("jsd", 1.0)
    if k > 2 and not (is_reverse_kl or (reverse.name, reverse.alpha) == ("skew_reverse_kl", 0.0)):
        logprobs[0, 0, -1] = -math.inf  # a padded slot with zero mass (KL(Q || P) would be infinite there)
    targets = SparseTargets(ids, logprobs, tail_mass)
    _assert_paths_agree(_both_paths(h, w, b, targets, _labels(rng, (batch, seq), vocab), name, **kw))


@pytest.mark.parametrize("teacher_form", ["dense", "bucket", "renormalize"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunk_logit_gradients_agree(name, teacher_form, rng) -> None:
    """The quantity the closed form computes, dLoss/d(raw logits) of one chunk, equals autograd's to 1e-6."""
    from distill.losses.chunk_loop import ChunkSettings, _autograd_chunk
    from distill.losses.closed_form import ChunkBuffers, closed_form_chunk
    from distill.losses.objective import Objective

    rows, vocab = 9, 211
    temperature = 1.0 if teacher_form == "bucket" else 1.6
    tail = "bucket" if teacher_form == "dense" else teacher_form
    objective = Objective.from_kwargs(
        name, 0.3, 0.1, temperature=temperature, ce_weight=0.4, kd_weight=0.7, tail=tail, vocab_size=vocab
    )
    logits = rng.randn(rows, vocab, scale=3.0)
    labels = torch.randint(0, vocab, (rows,), generator=rng.torch)
    labels[2] = -100
    teacher_logits, sparse = rng.randn(rows, vocab, scale=4.0), None
    if teacher_form != "dense":
        ids, logprobs, _ = rng.topk(teacher_logits, 9, with_tail=False)
        teacher_logits, sparse = None, SparseTargets(ids, logprobs)
    settings = ChunkSettings(objective, 7.0, rows, 0.25, "autograd")
    auto, auto_grad = _autograd_chunk(objective, logits.clone(), labels, teacher_logits, sparse, settings, True)
    buffers = ChunkBuffers(vocab, torch.float32, logits.device)
    student = buffers.get("student", rows).copy_(logits)
    teacher = None if teacher_logits is None else buffers.get("teacher", rows).copy_(teacher_logits)
    closed, closed_grad = closed_form_chunk(objective, student, labels, teacher, sparse, 7.0, 0.25, buffers)
    assert_close(closed_grad, auto_grad, TOL, "grad logits")
    for field in ("kd", "ce", "agree", "teacher_entropy"):
        assert_close(getattr(closed, field), getattr(auto, field), VALUE_TOL, field)


@pytest.mark.parametrize("name", ["forward_kl", "kl", "fkl"])
def test_closed_form_equals_autograd_sampled_targets(name, rng) -> None:
    batch, seq, hidden, vocab = 2, 19, 12, 300
    h, w, b = rng.head((batch, seq, hidden, vocab), scale=2.0, bias=True)
    probs = torch.softmax(rng.randn(batch, seq, vocab, scale=2.0), -1)
    ids = torch.multinomial(probs.reshape(-1, vocab), 12, generator=rng.torch).reshape(batch, seq, 12)
    weights = probs.gather(-1, ids) * rng.randn(batch, seq, 12).abs().add(0.5)  # need not sum to 1
    targets = SparseTargets(ids, weights.log(), estimate=True)
    results = _both_paths(h, w, b, targets, _labels(rng, (batch, seq), vocab), name, ce_weight=0.2, chunk_size=7)
    _assert_paths_agree(results)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("finite", [True, False])
def test_divergence_grad_is_the_derivative_of_its_value(name, finite, rng) -> None:
    """``Divergence.value_and_grad`` against autograd of the value, with log-probs as free variables."""
    rows, support = 6, 40
    student = torch.log_softmax(rng.randn(rows, support, scale=2.0, dtype=torch.float64), -1)
    teacher = torch.log_softmax(rng.randn(rows, support, scale=3.0, dtype=torch.float64), -1)
    if not finite:
        teacher[0, :3] = -math.inf  # zero-mass teacher entries
        student[1, -1] = teacher[1, -1] = -math.inf  # an empty bucket on both sides
        if name in ("reverse_kl", "skew_reverse_kl", "jsd"):  # their alpha = 0 / beta = 1 ends are reverse KLs
            student[0, :3] = -math.inf
    for beta, alpha in ((0.3, 0.1), (0.0, 0.0), (1.0, 0.0)):
        divergence = Divergence(name, beta=beta, alpha=alpha)
        leaf = student.clone().requires_grad_(True)
        expected = divergence(leaf, teacher, finite=finite)
        (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
        value, grad = divergence.value_and_grad(student.clone(), teacher.clone(), student.exp(), teacher.exp(), finite)
        assert_close(value, expected.detach(), 1e-12, f"{name} value")
        assert bool(torch.isfinite(grad).all())
        assert_close(grad, expected_grad, 1e-12, f"{name} grad")


class _OpLog(TorchDispatchMode):
    """Records every aten op's name and the shapes of its tensor outputs."""

    def __init__(self, min_numel: int = 2**62, vocab: int = 0) -> None:
        super().__init__()
        self.vocab = vocab
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []
        self.min_numel = min_numel
        self.storages: set[int] = set()  # distinct storages holding at least min_numel elements

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, tuple | list) else (out,)
        tensors = [t for t in outputs if isinstance(t, torch.Tensor)]
        if func.is_view or not tensors:
            return out
        self.ops.append((str(func.overloadpacket.__name__), [tuple(t.shape) for t in tensors]))
        self.storages.update(
            t.untyped_storage().data_ptr()
            for t in tensors
            if t.dim() == 2 and t.numel() >= self.min_numel and t.shape[-1] == self.vocab
        )
        return out


def _problem(rng: Rng, vocab: int = 97):
    tokens, hidden = 40, 16
    h, w, b = rng.head((1, tokens, hidden, vocab), scale=2.0, bias=True)
    teacher = TeacherHead(rng.randn(1, tokens, 8), rng.randn(vocab, 8))
    return h, w, b, teacher, rng.labels((1, tokens), vocab), (tokens, hidden, vocab)


@pytest.mark.parametrize("gradient", ["closed_form", "autograd"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_evaluation_does_no_gradient_work(gradient, mode, rng) -> None:
    """Under no_grad (the Trainer's prediction_step) the loss runs its forward only, trainable inputs or not."""
    h, w, b, teacher, labels, (tokens, hidden, vocab) = _problem(rng)
    kw = dict(student_bias=b, chunk_size=8, ce_weight=0.2, gradient=gradient)
    trained = fused_distillation_loss(h, w, teacher, labels, "jsd", **kw)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context, _OpLog() as log:
        evaluated = fused_distillation_loss(h, w, teacher, labels, "jsd", **kw)
    assert not evaluated.loss.requires_grad
    assert_close(evaluated.loss, trained.loss.detach(), 1e-7, "loss")
    chunks = math.ceil(int((labels != -100).sum()) / 8)
    # Row-wise dot products ([n, 1, 1] bmm outputs, e.g. the teacher's entropy) are forward math, not matmuls.
    matmuls = [
        name
        for name, outputs in log.ops
        if name in ("mm", "addmm", "addmm_", "bmm", "matmul") and outputs[0][-2:] != (1, 1)
    ]
    assert len(matmuls) == 2 * chunks, matmuls  # the student's and the teacher's head, nothing backward
    shapes = {shape for _, outputs in log.ops for shape in outputs}
    assert (vocab, hidden) not in shapes, "a head-weight gradient was allocated"
    assert not any(name in ("addcmul_", "scatter_add_") for name, _ in log.ops)


def test_closed_form_keeps_four_chunk_buffers(rng) -> None:
    """A dense teacher: four [chunk, V] storages ever exist (reused by every chunk); autograd needs many."""
    # Blocks of row_dot's partial products (at most 2**16 elements) are not chunk buffers: a chunk is larger.
    h, w, b, teacher, labels, (tokens, hidden, vocab) = _problem(rng, vocab=3001)
    chunk = 24
    distinct = {}
    for gradient in ("closed_form", "autograd"):
        with _OpLog(min_numel=chunk * vocab, vocab=vocab) as log:
            out = fused_distillation_loss(
                h, w, teacher, None, "jsd", student_bias=b, chunk_size=chunk, gradient=gradient
            )  # fmt: skip  (no labels: 40 rows, chunks of 24 + 16)
            out.loss.backward()
        distinct[gradient] = len(log.storages)
    # Live tensors have distinct storages, so this bounds the peak count from above (closed form) and below.
    assert distinct["closed_form"] == 4, distinct
    assert distinct["autograd"] >= 9, distinct


def test_closed_form_buffer_count(monkeypatch, rng) -> None:
    """The buffers the closed form asks for: 4 for a dense teacher, 2 for a sparse one."""
    from distill.losses import closed_form

    counts = []
    original = closed_form.ChunkBuffers.get

    def counting_get(self, name, rows):
        result = original(self, name, rows)
        counts.append(self.count)
        return result

    monkeypatch.setattr(closed_form.ChunkBuffers, "get", counting_get)
    h, w, b, teacher, labels, (tokens, hidden, vocab) = _problem(rng)
    fused_distillation_loss(h, w, teacher, labels, "jsd", chunk_size=8).loss.backward()
    assert max(counts) == 4
    counts.clear()
    ids, logprobs, _ = rng.topk(rng.randn(1, tokens, vocab), 5, with_tail=False)
    fused_distillation_loss(h, w, SparseTargets(ids, logprobs), labels, "jsd", chunk_size=8).loss.backward()
    assert max(counts) == 2


def test_second_backward_recomputes(rng) -> None:
    """retain_graph=True: a second backward gets the same gradients (recomputed), scaled by its own grad."""
    h, w, b, teacher, labels, _ = _problem(rng)
    out = fused_distillation_loss(h, w, teacher, labels, "jsd", student_bias=b, chunk_size=8)
    first = torch.autograd.grad(out.loss, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(out.loss * 3.0, (h, w, b))
    for a, c in zip(first, second, strict=True):
        assert_close(c, 3.0 * a, 1e-6, "second backward")


def test_gradient_argument_is_checked(rng) -> None:
    h, w, b, teacher, labels, _ = _problem(rng)
    with pytest.raises(ValueError, match="gradient"):
        fused_distillation_loss(h, w, teacher, labels, gradient="numerical")


def test_default_chunk_sizes() -> None:
    """128 MiB float32 buffers on a CPU, 512 MiB on a GPU, in multiples of 32 rows within [32, 4096]."""
    from distill.losses import default_chunk_size

    assert default_chunk_size(151936, "cpu") == 192 and default_chunk_size(151936, "cuda") == 864
    assert default_chunk_size(128256, "cuda") == 1024  # Liger's chunk at Llama 3's vocabulary
    assert default_chunk_size(32, "cpu") == 4096 and default_chunk_size(10**8, "cuda") == 32


def _small_blocks(monkeypatch, vocab: int, rows: int) -> None:
    """Make the CPU chunk body run in blocks of ``rows`` rows (the default gives one block at test sizes)."""
    from distill.losses import closed_form

    monkeypatch.setattr(closed_form, "CPU_BLOCK_ELEMENTS", rows * vocab)


@pytest.mark.parametrize("teacher_form", ["dense", "bucket", "renormalize"])
def test_blocked_chunk_body_equals_autograd(teacher_form, monkeypatch, rng) -> None:
    """Chunks of 7 rows in blocks of 2 (the last block shorter): values and gradients as the autograd path."""
    batch, seq, hidden, vocab = 2, 13, 16, 211
    _small_blocks(monkeypatch, vocab, 2)
    h, w, b = rng.head((batch, seq, hidden, vocab), scale=2.0, bias=True)
    if teacher_form == "dense":
        teacher = TeacherHead(rng.randn(batch, seq, 9), rng.randn(vocab, 9, scale=0.8), softcap=6.0)
    else:
        ids, logprobs, _ = rng.topk(rng.randn(batch, seq, vocab, scale=2.0), 9, with_tail=False)
        teacher = SparseTargets(ids, logprobs)
    for name, temperature in (("jsd", 1.0), ("skew_reverse_kl", 1.7), ("tvd", 1.0)):
        if teacher_form == "bucket" and temperature != 1.0:
            continue
        kw = dict(beta=0.3, temperature=temperature, ce_weight=0.3, student_softcap=5.0, chunk_size=7)
        tail = dict(tail=teacher_form) if teacher_form != "dense" else {}
        labels = _labels(rng, (batch, seq), vocab)
        _assert_paths_agree(_both_paths(h, w, b, teacher, labels, name, **kw, **tail))


def test_blocked_chunk_body_keeps_two_chunk_buffers(monkeypatch, rng) -> None:
    """In blocks, only the student's and the teacher's logits are chunk-sized: the scratch is block-sized."""
    h, w, b, teacher, labels, (tokens, hidden, vocab) = _problem(rng, vocab=3001)
    chunk = 24
    _small_blocks(monkeypatch, vocab, 4)
    with _OpLog(min_numel=chunk * vocab, vocab=vocab) as chunk_log:
        fused_distillation_loss(h, w, teacher, None, "jsd", chunk_size=chunk).loss.backward()
    with _OpLog(min_numel=4 * vocab, vocab=vocab) as block_log:
        fused_distillation_loss(h, w, teacher, None, "jsd", chunk_size=chunk).loss.backward()
    assert len(chunk_log.storages) == 2, chunk_log.storages
    assert len(block_log.storages) == 2 + 2, block_log.storages  # + student and teacher log-prob scratch


def test_compiled_by_default_nowhere_yet() -> None:
    """The compiled chunk body is opt-in: slower on a CPU (measured), unmeasured on a GPU."""
    from distill.losses.fused import default_compiled

    assert default_compiled("cpu") is False and default_compiled("cuda") is False


@pytest.mark.slow
def test_compiled_chunk_body_equals_closed_form(rng) -> None:
    """``compiled=True`` (torch.compile of the objective and its gradient) gives the closed form's results."""
    h, w, b, teacher, labels, _ = _problem(rng)
    results = []
    for compiled in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
        out = fused_distillation_loss(
            leaves[0], leaves[1], teacher, labels, "jsd", student_bias=leaves[2], chunk_size=16, ce_weight=0.2,
            compiled=compiled,
        )  # fmt: skip
        out.loss.backward()
        results.append((out, [leaf.grad for leaf in leaves]))
    (closed, closed_grads), (compiled_out, compiled_grads) = results
    for field in ("loss", "kd_loss", "ce_loss", "teacher_entropy", "top1_agreement"):
        assert_close(getattr(compiled_out, field), getattr(closed, field), TOL, field)
    for what, a, c in zip(("hidden", "weight", "bias"), compiled_grads, closed_grads, strict=True):
        assert_close(a, c, CONTRACTION_TOL[what], f"grad {what}")
    with torch.no_grad():
        evaluated = fused_distillation_loss(
            h, w, teacher, labels, "jsd", student_bias=b, chunk_size=16, ce_weight=0.2, compiled=True
        )
    assert_close(evaluated.loss, closed.loss.detach(), TOL, "evaluation loss")

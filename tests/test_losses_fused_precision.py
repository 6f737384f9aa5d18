"""The fused loss's matmul precision: which dtypes its head matmuls run in, and when CUDA may use TF32.

No GPU is needed: the TF32 decision is a pure function of the device type, the hidden states' dtype, autocast
and the ``tf32`` argument, and the dtype plumbing (16-bit hidden states into a float32 head, float32
accumulation of a 16-bit head's gradient) runs the same way on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close

from distill.losses import TeacherHead, fused_distillation_loss
from distill.losses.fused import _matmul_precision, uses_tf32


@pytest.mark.parametrize(
    ("device", "dtype", "tf32", "expected"),
    [
        ("cpu", torch.bfloat16, None, False),  # CPU arithmetic stays exact
        ("cpu", torch.float32, True, False),
        ("cuda", torch.bfloat16, None, True),  # 16-bit model: the float32 matmuls may use TF32
        ("cuda", torch.float16, None, True),
        ("cuda", torch.float32, None, False),  # a float32 model outside autocast stays float32
        ("cuda", torch.float32, True, True),  # a QLoRA student (float32 head and final norm) asks for it
        ("cuda", torch.bfloat16, False, False),  # and anyone may refuse it
    ],
)
def test_tf32_decision(device, dtype, tf32, expected) -> None:
    assert uses_tf32(device, dtype, tf32) is expected


def test_tf32_decision_follows_cuda_autocast(monkeypatch) -> None:
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert uses_tf32("cuda", torch.float32, None) is True
    assert uses_tf32("cuda", torch.float32, False) is False


@pytest.mark.parametrize("user_setting", ["ieee", "tf32", "none"])
def test_tf32_scope_restores_the_users_setting(user_setting) -> None:
    """Scoped: TF32 inside, the user's value (set through the new API, which made reading the old one raise) after."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = user_setting
        with _matmul_precision(True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == user_setting
        with _matmul_precision(False):
            assert matmul.fp32_precision == user_setting
    finally:
        matmul.fp32_precision = saved


def _problem(dtype_hidden: torch.dtype, dtype_weight: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, vocab = 29, 16, 301
    h = torch.randn(tokens, hidden, generator=gen).to(dtype_hidden).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype_weight).requires_grad_(True)
    teacher = TeacherHead(torch.randn(tokens, 8, generator=gen).to(dtype_hidden), torch.randn(vocab, 8, generator=gen))
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    return h, w, teacher, labels


def test_16bit_hidden_states_into_a_float32_head() -> None:
    """bf16 states into a float32 head (a QLoRA student's lm_head): cast per chunk; each gradient in its dtype."""
    h, w, teacher, labels = _problem(torch.bfloat16, torch.float32)
    out = fused_distillation_loss(h, w, teacher, labels, "jsd", chunk_size=8, ce_weight=0.1)
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # The same as float32 states holding the same (bf16-representable) values.
    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().clone().requires_grad_(True)
    teacher32 = TeacherHead(teacher.hidden.float(), teacher.weight)
    ref = fused_distillation_loss(h32, w32, teacher32, labels, "jsd", chunk_size=8, ce_weight=0.1)
    ref.loss.backward()
    assert_close(out.loss, ref.loss, 1e-6, "loss")
    assert_close(w.grad, w32.grad, 1e-6, "grad weight")
    assert_close(h.grad.float(), h32.grad, 1e-2, "grad hidden (bf16)")


def test_16bit_head_gradient_accumulates_in_float32(monkeypatch) -> None:
    """A bf16 head (full fine-tune): its gradient is summed over chunks in float32 and cast once at the end."""
    from distill.losses import chunk_loop

    h, w, teacher, labels = _problem(torch.bfloat16, torch.bfloat16)
    teacher = TeacherHead(teacher.hidden, teacher.weight.bfloat16())
    accumulators = []
    original = chunk_loop.run_chunks

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        accumulators.append(result[2])
        return result

    monkeypatch.setattr(chunk_loop, "run_chunks", recording)
    out = fused_distillation_loss(h, w, teacher, labels, "jsd", chunk_size=4)
    out.loss.backward()
    assert accumulators[0].dtype == torch.float32
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16
    assert_close(w.grad.float(), accumulators[0], 1e-2, "cast once at the end")

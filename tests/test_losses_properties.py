"""Mathematical properties of the divergences (hypothesis), and agreement with TRL's GKD loss."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reference import Rng, assert_close, fresh_seed

from distill.losses import DIVERGENCES, distillation_loss, generalized_jsd

NAMES = DIVERGENCES  # every divergence the package ships
SETTINGS = settings(max_examples=50, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def logit_pairs(draw, bound: float = 10.0, max_vocab: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two ``[rows, vocab]`` float64 arrays of logits in ``[-bound, bound]`` (student, teacher)."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, max_vocab)))
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return draw(arrays(np.float64, shape, elements=elements)), draw(arrays(np.float64, shape, elements=elements))


def per_token(student, teacher, name: str, dtype: torch.dtype = torch.float32, **kw) -> torch.Tensor:
    """Per-row divergence from the dense form, ``[rows]``."""
    s, t = (torch.as_tensor(x).to(dtype) for x in (student, teacher))
    return distillation_loss(s, t, None, name, reduction="none", **kw).loss


@SETTINGS
@given(
    logit_pairs(),
    st.sampled_from(NAMES),
    st.floats(0, 1),
    st.floats(0, 0.99),
    st.sampled_from([0.5, 1.0, 3.0]),
    DTYPES,
)
def test_divergences_are_nonnegative(pair, name, beta, alpha, temperature, dtype) -> None:
    values = per_token(*pair, name, dtype, beta=beta, alpha=alpha, temperature=temperature)
    assert bool(torch.isfinite(values).all())
    assert float(values.min()) >= -1e-6
    if name == "tvd":
        assert float(values.max()) <= 1 + 1e-6


@SETTINGS
@given(logit_pairs(), st.sampled_from(NAMES), st.floats(0, 1), st.floats(0, 0.99), DTYPES, st.data())
def test_zero_for_equal_distributions(pair, name, beta, alpha, dtype, data) -> None:
    student = pair[0]
    shift = data.draw(arrays(np.float64, (student.shape[0], 1), elements=st.floats(-5, 5)), label="row shift")
    for teacher in (student, student + shift):
        values = per_token(student, teacher, name, dtype, beta=beta, alpha=alpha)
        assert float(values.abs().max()) <= 1e-6


@SETTINGS
@given(logit_pairs(), st.sampled_from([1.0, 2.0]), DTYPES)
def test_jsd_half_is_symmetric_and_bounded(pair, temperature, dtype) -> None:
    forward = per_token(*pair, "jsd", dtype, beta=0.5, temperature=temperature)
    swapped = per_token(pair[1], pair[0], "jsd", dtype, beta=0.5, temperature=temperature)
    assert torch.allclose(forward, swapped, rtol=1e-5, atol=1e-6)
    assert float(forward.max()) <= math.log(2) + 1e-6


@SETTINGS
@given(logit_pairs(), st.sampled_from([1.0, 2.5]), DTYPES)
def test_special_parameter_values_are_the_plain_kls(pair, temperature, dtype) -> None:
    """beta 0 / 1 of the JSD and alpha 0 of the skews are exactly the forward / reverse KL."""
    forward = per_token(*pair, "forward_kl", dtype, temperature=temperature)
    reverse = per_token(*pair, "reverse_kl", dtype, temperature=temperature)
    assert torch.equal(per_token(*pair, "jsd", dtype, beta=0.0, temperature=temperature), forward)
    assert torch.equal(per_token(*pair, "jsd", dtype, beta=1.0, temperature=temperature), reverse)
    assert torch.equal(per_token(*pair, "skew_kl", dtype, alpha=0.0, temperature=temperature), forward)
    assert torch.equal(per_token(*pair, "skew_reverse_kl", dtype, alpha=0.0, temperature=temperature), reverse)


@SETTINGS
@given(logit_pairs(bound=1.5))
def test_jsd_is_continuous_at_its_ends_after_rescaling(pair) -> None:
    """``JSD_beta / beta -> KL(P || Q)`` as beta -> 0, and ``JSD_beta / (1 - beta) -> KL(Q || P)`` as beta -> 1.

    The formula ``beta KL(P||M) + (1-beta) KL(Q||M)`` itself tends to 0 at both ends (M -> Q, or
    M -> P); the endpoints are *defined* as the forward and reverse KL, as in TRL and Liger, which
    is the limit of the rescaled divergence. Near beta = 0, ``JSD_beta / beta = KL(P||Q) -
    beta * chi2(P||Q) / 2 + O(beta^2)``: bounded logits (|z| <= 1.5) keep chi2 / KL small enough
    for a 1e-2 relative agreement at beta = 1e-4. Float64, so rounding plays no part.
    """
    eps = 1e-4
    dtype = torch.float64
    forward = per_token(*pair, "forward_kl", dtype)
    reverse = per_token(*pair, "reverse_kl", dtype)
    near_zero = per_token(*pair, "jsd", dtype, beta=eps) / eps
    near_one = per_token(*pair, "jsd", dtype, beta=1 - eps) / eps
    assert torch.allclose(near_zero, forward, rtol=1e-2, atol=1e-9)
    assert torch.allclose(near_one, reverse, rtol=1e-2, atol=1e-9)


def test_generalized_jsd_matches_trl() -> None:
    """Same values and gradients as TRL's ``GKDTrainer.generalized_jsd_loss``: beta 0, .5, .9, 1; T 1, 2.

    One test rather than a parametrization: importing TRL takes seconds, paid once.
    """
    with warnings.catch_warnings():  # trl.experimental warns on import
        warnings.simplefilter("ignore")
        gkd = pytest.importorskip("trl.experimental.gkd", reason="trl is not installed")
    rng = Rng(fresh_seed())
    for beta in (0.0, 0.5, 0.9, 1.0):
        for temperature in (1.0, 2.0):
            student = rng.randn(3, 19, 101, scale=2.0).requires_grad_(True)
            teacher = rng.randn(3, 19, 101, scale=2.0)
            labels = rng.labels((3, 19), 101)
            ours = generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
            (ours_grad,) = torch.autograd.grad(ours, student)
            # TRL's default reduction "batchmean" with labels is the mean over unmasked tokens.
            trl = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
            (trl_grad,) = torch.autograd.grad(trl, student)
            case = f"beta={beta} T={temperature}"
            assert_close(ours, trl, 1e-5, f"value vs TRL, {case}")
            assert_close(ours_grad, trl_grad, 1e-4, f"grad vs TRL, {case}")

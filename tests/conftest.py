"""Shared fixtures: offline settings, a tokenizer trained in-process, tiny models, fresh seeds."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

# Before transformers/datasets are imported anywhere: nothing in the suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs one worker per core: more threads per worker only contend (small ops ran ~100x slower).
torch.set_num_threads(1)

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present (a plain ``pytest`` is CPU-only)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh random seed per test, seeded into torch and printed (pytest shows it on failure).

    ``DISTILL_TEST_SEED=<seed>`` replays a failure with the printed value.
    """
    override = os.environ.get("DISTILL_TEST_SEED")
    value = int(override) if override else random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}  (replay with DISTILL_TEST_SEED={value})")
    return value


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer from :func:`distill.testing.train_tiny_tokenizer` (vocab 512, ChatML)."""
    from distill.testing import train_tiny_tokenizer

    return train_tiny_tokenizer()


@pytest.fixture
def tiny_pair(tokenizer: PreTrainedTokenizerFast) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A fresh ``(teacher, student)`` pair of tiny Llamas sharing the tokenizer's vocabulary."""
    from distill.testing import tiny_teacher_student

    return tiny_teacher_student(vocab_size=len(tokenizer))


@pytest.fixture
def rng():  # noqa: ANN201 - tests/reference.Rng
    """Random inputs for the loss tests from a fresh seed (printed; replay with ``DISTILL_TEST_SEED``)."""
    from reference import Rng, fresh_seed

    return Rng(fresh_seed())


@pytest.fixture
def taught_pair(tokenizer: PreTrainedTokenizerFast) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """``(teacher, student)``: a tiny teacher trained on the arithmetic chat task, and a fresh student."""
    from trainer_helpers import taught_pair

    return taught_pair(tokenizer)

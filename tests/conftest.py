"""Shared fixtures: offline settings, a tokenizer trained in-process, tiny models, fresh seeds."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh random seed per test, seeded into torch and printed (pytest shows it on failure)."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture(scope="session")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from distill.testing import train_tiny_tokenizer

    return train_tiny_tokenizer()

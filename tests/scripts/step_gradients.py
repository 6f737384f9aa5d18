"""One optimizer step under ``accelerate launch``; rank 0 saves the student's gradients (DDP-averaged) to a file.

Used by tests/test_trainer_accumulation.py: 2 processes x accumulation 2 against one process with one batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accumulation_helpers import step_gradients  # noqa: E402

from distill.testing import train_tiny_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(cli.out)
    tokenizer = train_tiny_tokenizer()
    for name, overrides in (("off_policy", {}), ("on_policy", {"lmbda": 1.0})):
        result = step_gradients(out / name, tokenizer, cli.batch, cli.accumulation, **overrides)
        if result["trainer"].accelerator.is_main_process:
            torch.save(result["gradients"], out / f"{name}.pt")


if __name__ == "__main__":
    from teardown import run

    run(main)

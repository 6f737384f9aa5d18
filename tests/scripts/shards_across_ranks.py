"""Build the tiny top-k cache or generation run of ``build_cache_tiny.py`` / ``generate_tiny.py`` in one process
or, under ``accelerate launch`` / ``torchrun``, across all ranks (tests/test_shards.py).

Usage: ``python tests/scripts/shards_across_ranks.py {cache,generate} OUT_DIR [--delay S] [--fail-rank R]``.
Each rank prints ``ready rank=R pid=P`` once its model is built (so a test can SIGKILL one rank) and
``done rank=R`` at the end. ``--delay`` sleeps before each teacher forward, stretching the build so a kill
lands inside it; ``--fail-rank R`` makes rank R's teacher raise on its third forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # the sibling scripts hold the builds' settings

import build_cache_tiny  # noqa: E402
import generate_tiny  # noqa: E402
import torch  # noqa: E402


def _hook(rank: int, delay: float, fail: bool):
    """Hooks the teacher's forward (sleep ``delay``; raise on the third call if ``fail``), then says ready."""

    def prepare(teacher: torch.nn.Module) -> None:
        calls = 0

        def before_forward(*args: object) -> None:
            nonlocal calls
            calls += 1
            if fail and calls == 3:
                raise RuntimeError("injected teacher failure")
            time.sleep(delay)

        teacher.register_forward_pre_hook(before_forward)
        print(f"ready rank={rank} pid={os.getpid()}", flush=True)

    return prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=("cache", "generate"))
    parser.add_argument("out_dir")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    prepare = _hook(rank, args.delay, args.fail_rank == rank)
    if args.job == "cache":
        build_cache_tiny.build(args.out_dir, prepare=prepare)
    else:
        teacher, tokenizer = generate_tiny.tiny_generation()
        prepare(teacher)
        generate_tiny.generate(teacher, tokenizer, args.out_dir)
    print(f"done rank={rank}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():  # tear the gloo groups down before exit: their threads abort the process otherwise
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run a test script's ``main`` and tear its process groups down before the interpreter exits.

A gloo process group left alive at exit can abort its process from a background thread ("terminate called
without an active exception", exit -6) after the script's work succeeded; under ``make test`` this failed a
2-process run now and then. Every script launched with several processes ends through :func:`run`.
"""

from __future__ import annotations

from collections.abc import Callable


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; then, whatever it did (returned or raised), destroy the default process group if any."""
    try:
        main()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

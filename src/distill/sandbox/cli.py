"""``distill doctor``: which kernel layers this machine offers the sandbox, and which a run uses."""

from __future__ import annotations

import argparse

from distill.sandbox.kernel import REQUIRED_LAYERS, SandboxUnavailable, host_report
from distill.sandbox.run import run_python

_PROBE = "import sys\nprint(sys.version.split()[0])"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``distill doctor`` to the ``distill`` command."""
    parser = subparsers.add_parser(
        "doctor",
        help="check the kernel layers the sandbox for model-written code needs",
        description="Print the kernel facts behind distill.sandbox, run a probe program in it and say which "
        "isolation layers it got. Exit status 0 when strict isolation is available, 1 when it is not.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the report; returns 0 when a ``strict`` run works here."""
    print("distill doctor: the sandbox for model-written code (distill.sandbox)\n")
    for key, value in host_report().items():
        print(f"  {key:45s} {value}")
    try:
        result = run_python(_PROBE, timeout_s=20)
        status = 0
        print("\nstrict isolation: available")
    except SandboxUnavailable as refused:
        print(f"\nstrict isolation: NOT available\n{refused}")
        result = run_python(_PROBE, timeout_s=20, isolation="weak")
        status = 1
        print('\nWith isolation="weak" a run gets only the layers below.')
    print(f"\nA run here uses: {', '.join(result.layers)}")
    missing = [layer for layer in REQUIRED_LAYERS if layer not in result.layers and layer != "process-limit"]
    if missing:
        print(f"Missing: {', '.join(missing)}")
    limits = ", ".join(f"{key}={value}" for key, value in result.limits.items())
    print(f"Limits read back in the program: {limits}")
    print(f"Probe: exit {result.returncode} in {result.duration_s * 1000:.0f} ms, Python {result.stdout.strip()}")
    return status

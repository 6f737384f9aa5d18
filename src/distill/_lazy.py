"""Package attributes imported on first use, so that importing a package (or one of its CLI modules) stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def lazy_exports(package: str, submodules: Sequence[str], names: Sequence[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that finds ``names`` in ``package``'s ``submodules`` when first asked.

    Args:
        package: the package's ``__name__``.
        submodules: its submodules (relative names) that define the exported names, searched in order.
        names: the exported names (the package's ``__all__``); any other name raises ``AttributeError``.
    """
    exported = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in exported:
            for submodule in submodules:
                module = importlib.import_module(f"{package}.{submodule}")
                if hasattr(module, name):
                    return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

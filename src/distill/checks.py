"""One validator per kind of argument, shared by the library, the CLIs and the recipes.

Every entry point checks its numbers, names and flags with these before it loads anything, so a bad
value costs a second, not a model load, and reads the same wherever it was typed. Pure Python: no
torch, no transformers (the CLIs import this module to build their parsers).

Each ``check_*`` returns the value (converted where that is lossless) or raises :class:`InputError`,
whose message names the argument, the value and what is accepted. ``arg_*`` wrap them as argparse
``type=`` callables, so the command line refuses a value while parsing.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "InputError",
    "arg_bool",
    "arg_dtype",
    "arg_float",
    "arg_int",
    "check_bool",
    "check_device",
    "check_dtype_name",
    "check_float",
    "check_int",
    "check_output_folder",
    "check_writable_folder",
    "is_path_like",
]

# The one set of spellings of a boolean flag: what HfArgumentParser's string_to_bool accepts, plus on/off.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
# The one set of dtype names (models.loading.resolve_dtype maps them to torch dtypes).
DTYPE_NAMES = ("auto", "bf16", "bfloat16", "fp16", "float16", "half", "fp32", "float32", "float")


class InputError(ValueError):
    """An argument, file or folder a user gave cannot be used; the message says which and what to do."""


def check_int(value: Any, name: str, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (``None``: no bound); bools and fractions are refused.

    Args:
        value: an int, or a float / string holding a whole number (``"8"``, ``8.0``).
        name: the argument's name, for the message (e.g. ``"--batch-size"``).
        minimum, maximum: inclusive bounds.
    """
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise InputError(f"{name} must be a whole number; got {value!r}.")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise InputError(f"{name} must be {_range_text(minimum, maximum)}; got {number}.")
    return number


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` as a finite float within the bounds; NaN and infinities are always refused.

    Args:
        value: a number or a string holding one.
        name: the argument's name, for the message.
        minimum, maximum: bounds (``None``: none); inclusive unless ``exclusive_*``.
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise InputError(f"{name} must be a number; got {value!r}.")
    low_ok = minimum is None or (number > minimum if exclusive_minimum else number >= minimum)
    high_ok = maximum is None or (number < maximum if exclusive_maximum else number <= maximum)
    if not math.isfinite(number) or not (low_ok and high_ok):
        wanted = _range_text(minimum, maximum, exclusive_minimum, exclusive_maximum)
        wanted = "" if wanted == "any" else f" {wanted}"
        raise InputError(f"{name} must be a finite number{wanted}; got {value!r}.")
    return number


def _range_text(
    minimum: float | None, maximum: float | None, exclusive_minimum: bool = False, exclusive_maximum: bool = False
) -> str:
    low = None if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
    high = None if maximum is None else f"{'<' if exclusive_maximum else '<='} {maximum}"
    if low and high:
        return f"{low} and {high}"
    return low or high or "any"


def check_bool(value: Any, name: str) -> bool:
    """A boolean flag: a bool, 0/1, or one of ``true/false, yes/no, y/n, t/f, on/off, 1/0`` (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise InputError(f"{name} must be true or false (also yes/no, y/n, 1/0, on/off); got {value!r}.")


def check_dtype_name(value: Any, name: str = "dtype") -> str:
    """A dtype name as :func:`distill.models.resolve_dtype` takes it (``auto``, ``bf16``, ``float32``, ...)."""
    text = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    if text not in DTYPE_NAMES:
        raise InputError(f"{name} must be one of {', '.join(DTYPE_NAMES)}; got {value!r}.")
    return text


def check_device(value: Any, name: str = "--device") -> str | None:
    """A device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked before loading.

    Returns ``value`` unchanged (``None`` stays ``None``: the caller's default).
    """
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"{name} {value!r} is not a device: use cpu, cuda, cuda:N or mps ({error}).") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {value!r}: this machine has no CUDA GPU (torch sees none). Use --device cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"{name} {value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"{name} {value!r}: MPS is not available on this machine. Use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise InputError(f"{name} {value!r}: use cpu, cuda, cuda:N or mps.")
    return value


def is_path_like(name: str) -> bool:
    """Whether a model name can only mean a local folder (so "not found" must not become a hub lookup).

    True for names starting with ``/``, ``./``, ``../``, ``~`` or ``.``, with more than one ``/`` (hub ids
    are ``name`` or ``org/name``), ending in ``/``, or holding a backslash. (``out/student`` next to an
    ``out/`` folder may still be a hub id: a local mirror of the hub's layout; see
    :func:`distill.models.loading.check_model_source`.)
    """
    text = os.fspath(name)
    return text.startswith(("/", "~", ".")) or text.endswith("/") or "\\" in text or text.count("/") > 1


def check_writable_folder(path: str | os.PathLike, name: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{name} {os.fspath(path)!r} is a file, not a folder: give a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(
            f"{name} {os.fspath(path)!r} cannot be created ({error.strerror}): pick another folder."
        ) from None
    try:  # a real write: permissions alone do not tell (root, read-only mounts, a full disk)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".distill-write-test-"):
            pass
    except OSError as error:
        raise InputError(
            f"{name} {os.fspath(path)!r} is not writable ({error.strerror}): pick another folder."
        ) from None
    return folder


def check_output_folder(path: str | os.PathLike, owns: Callable[[Path], bool], what: str, name: str = "--out") -> Path:
    """A writable output folder that is empty or holds only our own files (a run to resume, or its leftovers).

    Args:
        path: the folder (created if missing).
        owns: whether a file or folder in it belongs to this kind of output (manifest, shards, our temp files).
        what: the kind of output, for the message (e.g. ``"top-k cache"``).
        name: the argument's name, for the message.

    Raises:
        InputError: the folder cannot be written, or holds files that are not ours: they are listed and
            nothing is written or deleted.
    """
    folder = check_writable_folder(path, name)
    foreign = sorted(entry.name for entry in folder.iterdir() if not owns(entry))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(
            f"{name} {os.fspath(path)!r} holds files that are not a {what} ({shown}); nothing was written or "
            f"deleted. Give an empty or new folder (or the folder of an unfinished {what} to resume it)."
        )
    return folder


def _argparse_type(check: Callable[..., Any], **kwargs: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(text, "the value", **kwargs)
        except InputError as error:
            raise argparse.ArgumentTypeError(str(error).replace("the value must", "must")) from None

    parse.__name__ = check.__name__.removeprefix("check_")  # argparse names the type in some messages
    return parse


def arg_int(minimum: int | None = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for whole numbers in ``[minimum, maximum]``."""
    return _argparse_type(check_int, minimum=minimum, maximum=maximum)


def arg_float(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type=`` for finite numbers within bounds."""
    return _argparse_type(
        check_float,
        minimum=minimum,
        maximum=maximum,
        exclusive_minimum=exclusive_minimum,
        exclusive_maximum=exclusive_maximum,
    )


def arg_bool(text: str) -> bool:
    """An argparse ``type=`` for boolean flags (``--tiny y``), with the spellings of :func:`check_bool`."""
    try:
        return check_bool(text, "the value")
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error).replace("the value must", "must")) from None


def arg_dtype(text: str) -> str:
    """An argparse ``type=`` for dtype names (:data:`DTYPE_NAMES`)."""
    try:
        return check_dtype_name(text, "the value")
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error).replace("the value must", "must")) from None

"""Is a saved folder whole? Cheap structural checks of the files a model or checkpoint folder holds.

A process killed while saving (SIGKILL, power cut, a full disk) leaves files cut short. Loading them
fails deep inside safetensors or torch with messages that name neither the file nor the cause; these
checks read only headers and directory records (no tensor data), so they cost milliseconds even for
a checkpoint of many GB, and they name the file.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from distill.checks import InputError

__all__ = ["IncompleteFilesError", "damaged_files"]

# safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes.
_SAFETENSORS_PREFIX = 8


class IncompleteFilesError(InputError):
    """A model or checkpoint folder holds files cut short (a save that did not finish); the message names them."""


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(_SAFETENSORS_PREFIX)
        if len(prefix) < _SAFETENSORS_PREFIX:
            return f"{size} bytes, shorter than a safetensors header"
        (header_bytes,) = struct.unpack("<Q", prefix)
        if _SAFETENSORS_PREFIX + header_bytes > size:
            return f"its header promises {header_bytes:,} bytes of metadata but the file has {size:,} bytes in all"
        try:
            header = json.loads(file.read(header_bytes))
        except (UnicodeDecodeError, ValueError):
            return "its safetensors header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = _SAFETENSORS_PREFIX + header_bytes + max(ends, default=0)
    if size < expected:
        return f"it has {size:,} bytes but its tensors end at byte {expected:,}"
    return None


def _zip_problem(path: Path) -> str | None:
    # torch.save writes a zip archive; its directory is at the end, so a cut file has none.
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a whole torch file ({error})"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return f"not valid JSON ({error})"
    return None


_CHECKS = {
    ".safetensors": _safetensors_problem,
    ".bin": _zip_problem,
    ".pt": _zip_problem,
    ".pth": _zip_problem,
    ".json": _json_problem,
}


def damaged_files(folder: str | Path) -> list[tuple[Path, str]]:
    """The files of ``folder`` (not its subfolders) that are cut short or unreadable, with what is wrong.

    Checks ``.safetensors`` (header and total size), ``.bin``/``.pt``/``.pth`` written by ``torch.save``
    (a whole zip directory; legacy non-zip pickles are skipped) and ``.json`` (parses). Other files pass.

    Args:
        folder: a ``save_pretrained`` or ``Trainer`` checkpoint folder.

    Returns:
        ``[(path, problem)]``, empty when every file is whole.
    """
    problems = []
    for path in sorted(Path(folder).iterdir()):
        check = _CHECKS.get(path.suffix)
        if check is None or not path.is_file():
            continue
        if check is _zip_problem and not _starts_like_zip(path):
            continue  # a legacy (pre-1.6) torch pickle: no structure to check cheaply
        problem = check(path)
        if problem is not None:
            problems.append((path, problem))
    return problems


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        start = file.read(4)
    # An empty or nearly empty file is a cut one, whatever it was going to be.
    return len(start) < 4 or start == b"PK\x03\x04"

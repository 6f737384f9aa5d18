"""Teachers that run once: an offline top-k cache of a teacher's targets (format: ``docs/offline.md``).

* :func:`build_cache` (``distill cache``): run a teacher over a dataset and store, for every token
  that carries loss, its top-k ids, log-probs and tail mass, in checksummed parquet shards with a
  manifest; resumable after any interruption, byte-identical to an uninterrupted run.
* :class:`distill.teachers.CachedTeacher`: train from such a cache with no teacher model loaded.
* :class:`Encoding`: the byte encodings (``"compact"``, about 3 bytes per entry; ``"fp16"``, 6).

The format itself (encoding, reader, sampled targets) lives in :mod:`distill.formats`, below the teachers;
this package is the job that writes it (:mod:`distill.cache.writer`, :mod:`distill.cache.cli`).
"""

from __future__ import annotations

from typing import Any

from distill.formats.encoding import ENCODINGS, EncodedTokens, Encoding, bytes_per_token
from distill.formats.reader import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheMissError,
    CacheReader,
    row_key,
    tokenizer_fingerprint,
)

__all__ = [
    "ENCODINGS",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CacheMissError",
    "CacheReader",
    "EncodedTokens",
    "Encoding",
    "build_cache",
    "bytes_per_token",
    "row_key",
    "tokenizer_fingerprint",
]


def __getattr__(name: str) -> Any:
    # The writer loads torch, the models and the teachers: imported on first use, so `distill cache --help` and
    # readers of a cache do not pay for them.
    if name == "build_cache":
        from distill.cache.writer import build_cache

        return build_cache
    raise AttributeError(f"module 'distill.cache' has no attribute {name!r}")

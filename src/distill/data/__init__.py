"""Datasets in, tensors out, for the distillation trainer.

:func:`prepare_dataset` checks a ``datasets.Dataset`` (chat ``messages``, ``prompt``/``completion``,
``text`` or pre-tokenized rows; see :func:`detect_format`), tokenizes it with the student's tokenizer,
marks which tokens carry loss, truncates, optionally packs, and returns a :class:`DataReport`.
:class:`DistillCollator` pads rows into batches. Every bad input raises :class:`DataError` naming the
rows and the fix. Layouts and conventions: ``docs/data.md``.
"""

from distill.data.collator import DistillCollator, packed_attention_mask
from distill.data.formatting import DataError, detect_format
from distill.data.prepare import DataReport, prepare_dataset
from distill.data.streaming import STREAM_CHECKED_ROWS, is_stream, prepare_stream

__all__ = [
    "DataError",
    "DataReport",
    "DistillCollator",
    "STREAM_CHECKED_ROWS",
    "detect_format",
    "is_stream",
    "packed_attention_mask",
    "prepare_dataset",
    "prepare_stream",
]

"""Packing: several tokenized rows (documents) per training row, so no compute is spent on padding.

Documents are packed by best-fit decreasing (longest first, each into the fullest row it still fits),
in groups of :data:`PACKING_GROUP_SIZE` documents so memory stays bounded on large datasets. Each
packed row carries ``position_ids`` restarting at 0 per document, from which transformers keeps the
documents apart (see :mod:`distill.data.collator`).
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

import datasets

from distill.data.tokenization import IGNORE_INDEX

__all__ = ["PACKING_GROUP_SIZE", "best_fit_decreasing", "pack_dataset"]

PACKING_GROUP_SIZE = 10_000


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group items into bins of total length ``<= capacity``, deterministically.

    Args:
        lengths: length of each item; each must be ``<= capacity``.
        capacity: bin size.

    Returns:
        Bins as lists of item indices, each in increasing order; bins ordered by their first item.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (room left, bin index), sorted: bisect finds the fullest bin the item still fits in.
    open_bins: list[tuple[int, int]] = []
    for item in order:
        length = lengths[item]
        if length > capacity:
            raise ValueError(f"item {item} has length {length} > capacity {capacity}")
        position = bisect.bisect_left(open_bins, (length, -1))
        if position < len(open_bins):
            room, bin_index = open_bins.pop(position)
        else:
            room, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(item)
        if room - length > 0:
            bisect.insort(open_bins, (room - length, bin_index))
    return sorted(sorted(items) for items in bins)


def _pack_batch(batch: dict[str, list[Any]], max_length: int) -> dict[str, list[list[int]]]:
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for items in best_fit_decreasing([len(ids) for ids in batch["input_ids"]], max_length):
        input_ids, labels, position_ids = [], [], []
        for item in items:
            input_ids += batch["input_ids"][item]
            # A document's first token is never a target: predicting it from the previous document's
            # last token would teach the model a transition that does not exist.
            labels += [IGNORE_INDEX] + batch["labels"][item][1:]
            position_ids += range(len(batch["input_ids"][item]))
        packed["input_ids"].append(input_ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(position_ids)
    return packed


def pack_dataset(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Pack the rows of a tokenized dataset into rows of at most ``max_length`` tokens.

    Runs in one process whatever ``num_proc`` tokenization used, so the packing does not depend on it.

    Args:
        dataset: rows with ``input_ids`` and ``labels`` (lists of ints, each at most ``max_length`` long).
        max_length: tokens per packed row, at most.

    Returns:
        Rows with ``input_ids``, ``labels`` and ``position_ids`` (0, 1, ... per document); other columns
        (``prompt_input_ids``) are dropped.
    """
    return dataset.map(
        functools.partial(_pack_batch, max_length=max_length),
        batched=True,
        batch_size=PACKING_GROUP_SIZE,
        remove_columns=dataset.column_names,
        desc="Packing",
    )

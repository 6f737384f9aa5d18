"""Teacher data generation for sequence-level KD: sample completions, filter them, write parquet shards.

Example:
    >>> from distill.generation import generate_dataset, load_generated
    >>> out = generate_dataset(teacher, tokenizer, prompts, "gen/", num_completions=4, temperature=0.8)
    >>> dataset = load_generated(out)  # rows {"prompt", "completion"} or {"messages"}, ready for the Trainer
"""

from typing import TYPE_CHECKING

from distill._lazy import lazy_exports

# Imported on first use: generate imports torch, and ``distill generate --help`` should not wait for it.
if TYPE_CHECKING:
    from distill.generation.filters import HumanEvalFilter
    from distill.generation.generate import RowFilter, generate_dataset, load_generated, read_manifest
    from distill.generation.sampling import sample_batch, sequence_seed

__all__ = [
    "HumanEvalFilter",
    "RowFilter",
    "generate_dataset",
    "load_generated",
    "read_manifest",
    "sample_batch",
    "sequence_seed",
]

__getattr__ = lazy_exports(__name__, ("filters", "generate", "sampling"), __all__)

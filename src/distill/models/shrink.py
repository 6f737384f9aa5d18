"""A smaller student made from a teacher: a subset of its decoder layers (the DistilBERT initialisation).

Keeping the teacher's embeddings, final norm, head and every k-th layer gives a student that
shares the tokenizer and starts far closer to the teacher than random weights: the standard start
for depth-reduced students (DistilBERT, Sanh et al. 2019; the layer-pruned students of Minitron).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = ["PRUNING_RECORD_KEY", "evenly_spaced_layers", "student_from_teacher"]

# ``config.json`` key of the record of which teacher units a student kept (written here and by
# distill.pruning; read by intermediate-layer distillation).
PRUNING_RECORD_KEY = "distill_pruning"


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``[0, num_layers)``, always the first and the last."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"Keep between 1 and {num_layers} layers; got {keep}.")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def _decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's ``ModuleList`` of layers (``model.model.layers`` for Llama, Qwen, Mistral, Gemma, ...)."""
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `{model.base_model_prefix}.layers` list of decoder layers; "
            "student_from_teacher supports Llama-style decoders (Llama, Qwen2/3, Mistral, Gemma, SmolLM, Phi-3)."
        )
    return layers


def student_from_teacher(
    teacher: PreTrainedModel, layers: int | Sequence[int], *, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A new model with the teacher's embeddings, head, final norm and a subset of its decoder layers.

    Args:
        teacher: a Llama-style causal LM (left unchanged; the student holds copies).
        layers: how many layers to keep (evenly spaced, first and last included) or their indices.
        dtype: the student's dtype (default: the teacher's).

    Returns:
        The student, in train mode, with ``config.num_hidden_layers`` (and per-layer config lists
        such as ``layer_types``) updated and each attention's ``layer_idx`` renumbered so its KV
        cache works.
    """
    teacher_layers = _decoder_layers(teacher)
    total = len(teacher_layers)
    keep = evenly_spaced_layers(total, layers) if isinstance(layers, int) else list(layers)
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"Layer indices must be distinct and in [0, {total}); got {keep}.")
    # Copy everything but the decoder layers, then only the kept layers: never two full models in memory.
    base = getattr(teacher, teacher.base_model_prefix)
    base.layers = nn.ModuleList()
    try:
        student = copy.deepcopy(teacher)
    finally:
        base.layers = teacher_layers
    kept = nn.ModuleList(copy.deepcopy(teacher_layers[i]) for i in keep)
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    getattr(student, student.base_model_prefix).layers = kept
    config = student.config
    for name, value in list(vars(config).items()):
        # Per-layer settings (layer_types for sliding windows, ...) follow the kept layers.
        if isinstance(value, list) and len(value) == total and name != "architectures":
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    # The record intermediate-layer distillation maps student layers to teacher layers with.
    setattr(config, PRUNING_RECORD_KEY, {"teacher_num_hidden_layers": total, "teacher_hidden_size": config.hidden_size,
                                         "layers": keep, "hidden_channels": None})  # fmt: skip
    if dtype is not None:
        student = student.to(dtype)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student.train()

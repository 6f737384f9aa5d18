"""An in-process teacher: a frozen causal LM on its own device, dtype and quantization."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.losses import TeacherHead
from distill.models.decoder import OutputHead, final_hidden_states, output_head_of
from distill.teachers.base import Teacher
from distill.teachers.hidden import catch_layer_outputs, decoder_layers
from distill.teachers.sharding import full_tensor, is_sharded, weight_rows


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class ModelTeacher(Teacher):
    """A ``transformers`` causal LM used as a frozen teacher.

    The model is put in eval mode with every parameter frozen, so dropout is off and no optimizer
    state or gradient is ever kept for it. :meth:`targets` runs only its decoder (under
    ``torch.no_grad``) and hands the final hidden states plus its head to the fused loss: the
    teacher's ``[tokens x vocab]`` logits are never built at once.

    Args:
        model: the teacher, loaded however the user likes (bf16, 4-bit, 8-bit, on any device); see
            :func:`distill.models.load_causal_lm`.
        tokenizer: its tokenizer, used to check it is the student's.
        device: move an unquantized model here (quantized ones stay where they were loaded).
        dtype: cast an unquantized model to this dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        model.eval()
        model.requires_grad_(False)
        if dtype is not None and not _is_quantized(model):
            model.to(dtype)
        self.model = model
        self.tokenizer = tokenizer
        self._heads: dict[torch.device, OutputHead] = {}
        self._hidden_layers: tuple[int, ...] = ()
        self.place(device)

    def place(self, device: torch.device | str | None) -> None:
        """Move an unquantized teacher to ``device`` (whole; quantized ones stay where they were loaded)."""
        if device is not None and not _is_quantized(self.model):
            self.model.to(device)
            self._heads.clear()

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights (and its forward pass) live."""
        return _model_device(self.model)

    @property
    def vocab_rows(self) -> int:
        return weight_rows(self.model.get_output_embeddings().weight)

    def hidden_state_shape(self) -> tuple[int, int]:
        return len(decoder_layers(self.model)), int(self.model.config.get_text_config().hidden_size)

    def request_hidden_states(self, layers: tuple[int, ...]) -> None:
        num_layers, _ = self.hidden_state_shape()
        if any(not 0 <= index < num_layers for index in layers):
            raise ValueError(f"Teacher layer indices must be in [0, {num_layers}); got {list(layers)}.")
        self._hidden_layers = tuple(layers)

    def head_on(self, device: torch.device) -> OutputHead:
        """The teacher's head with its tensors on ``device``.

        A copy to another device is made once and reused. A sharded (FSDP2) teacher's head is
        gathered on every call and not kept, so only one step holds it whole.
        """
        if device in self._heads:
            return self._heads[device]
        head = output_head_of(self.model)
        weight = full_tensor(head.weight).to(device)
        bias = None if head.bias is None else full_tensor(head.bias).to(device)
        gathered = OutputHead(weight, bias, head.softcap)
        if not is_sharded(head.weight) and weight.data_ptr() != head.weight.data_ptr():
            self._heads[device] = gathered
        return gathered

    @torch.no_grad()
    def targets(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> TeacherHead:
        """The teacher's final hidden states ``[batch, seq, H_t]`` and head, on ``input_ids``' device.

        After :meth:`request_hidden_states`, also the outputs of those decoder layers, caught in the same
        forward (``layer_states``, each ``[batch, seq, H_t]`` in the teacher's compute dtype).
        """
        out_device = input_ids.device
        here = self.device

        def to_teacher(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(here, non_blocking=True)

        with catch_layer_outputs(self.model, self._hidden_layers) as caught:
            hidden = final_hidden_states(
                self.model, to_teacher(input_ids), to_teacher(attention_mask), to_teacher(position_ids)
            )
        head = self.head_on(out_device)
        # The head matmul runs in the head's dtype (a 4-bit teacher's head is kept in its compute dtype).
        hidden = hidden.to(out_device, dtype=head.weight.dtype, non_blocking=True)
        layer_states = None
        if self._hidden_layers:
            layer_states = tuple(caught[index].to(out_device, non_blocking=True) for index in self._hidden_layers)
        return TeacherHead(hidden, head.weight, head.bias, head.softcap, layer_states=layer_states)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_attention_mask: Tensor, **generation_kwargs: Any) -> Tensor:
        here = self.device
        generated = self.model.generate(
            input_ids=prompt_ids.to(here), attention_mask=prompt_attention_mask.to(here), **generation_kwargs
        )
        return generated.to(prompt_ids.device)

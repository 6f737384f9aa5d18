"""Split a causal LM into the two parts the fused loss needs: its decoder and its output head.

Running only the decoder gives the final hidden states ``[batch, seq, H]`` (after the final norm);
the head's weight ``[V, H]`` then goes to the fused loss, which never builds ``[tokens x V]`` logits.
Works for any ``transformers`` causal LM whose logits are ``softcap(hidden @ W.T + b)``, and through
a ``peft`` wrapper (LoRA layers are injected in place, so the decoder found holds them). The head is an
:class:`~distill.losses.OutputHead`, whose ``logits()`` is the one head -> logits function of the package.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.losses.targets import OutputHead


class UnsupportedModelError(ValueError):
    """The model's logits are not a plain (soft-capped) linear head over its decoder's hidden states."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside DDP / torch.compile / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engines
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft.PeftModel: LoRA layers live inside the base model
            model = model.get_base_model()
        else:
            return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The module mapping ``input_ids`` to final hidden states (``model.model`` for Llama/Qwen/Gemma)."""
    inner = _unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or decoder is inner:
        raise UnsupportedModelError(
            f"Cannot find the decoder of {type(inner).__name__} (model.get_decoder()). The fused loss needs it; "
            "set loss_implementation='dense' to distill from the model's full logits instead."
        )
    return decoder


def output_head_of(model: nn.Module) -> OutputHead:
    """The LM head of ``model`` as tensors, checked to be a plain linear layer."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if not isinstance(head, nn.Linear) or type(head).__name__ != "Linear":
        raise UnsupportedModelError(
            f"The output head of {type(inner).__name__} is a {type(head).__name__}, not a plain nn.Linear (is it "
            "quantized, or a LoRA target?). Keep 'lm_head' out of LoRA target_modules / quantization, or set "
            "loss_implementation='dense'."
        )
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        raise UnsupportedModelError(
            f"{type(inner).__name__} scales its logits (config.logit_scale); the fused loss does not model that. "
            "Set loss_implementation='dense'."
        )
    return OutputHead(head.weight, head.bias, getattr(config, "final_logit_softcapping", None))


def final_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """``[batch, seq, H]`` final hidden states of ``model`` (after its final norm), without full logits.

    The model is called through its own (outermost) ``forward`` with ``logits_to_keep=1``, and the
    decoder's output is caught with a forward hook. Going through the outer forward matters: a
    ``DistributedDataParallel`` wrapper only all-reduces gradients after its own ``forward`` ran
    (calling the inner decoder directly would leave every rank with different weights), and FSDP /
    DeepSpeed gather parameters in it. The head then runs on one position per row only.

    Args:
        model: a causal LM (or a peft / DDP / DeepSpeed wrapper of one).
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: ``[batch, seq]`` 1 for real tokens, 0 for padding; ``None`` for packed rows.
        position_ids: ``[batch, seq]`` positions, e.g. restarting per document in packed rows.
    """
    decoder = decoder_of(model)
    caught: list[Tensor] = []

    def catch(module: nn.Module, args: object, output: object) -> None:
        caught.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])  # type: ignore[index]

    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    handle = decoder.register_forward_hook(catch)
    try:
        try:
            model(**inputs, logits_to_keep=1)
        except TypeError as error:
            if "logits_to_keep" not in str(error):
                raise
            # Older model classes have no logits_to_keep: their forward builds full logits, which are dropped.
            caught.clear()
            model(**inputs)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise UnsupportedModelError(
            f"The decoder of {type(_unwrap(model)).__name__} ran {len(caught)} times in one forward; cannot tell "
            "which output is the final hidden state. Set loss_implementation='dense'."
        )
    return caught[0]


def full_logits(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
) -> Tensor:
    """``[batch, seq, V]`` logits from the model's own forward (the dense, materialised path)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

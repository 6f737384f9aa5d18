"""The outputs of chosen decoder layers (the residual stream after them), caught during a model's own forward.

Intermediate-layer distillation compares the residual stream after student layer ``i`` with the one
after teacher layer ``j``. Both are caught with forward hooks on the decoder layers while the model
runs its ordinary (outermost) forward, the one that also gives the logit targets / final hidden
states, so no second forward is needed and DDP / FSDP / DeepSpeed wrappers behave as usual (see
:func:`distill.models.decoder.final_hidden_states`). Hooks rather than ``output_hidden_states``:
that tuple holds every layer (all kept alive), starts with the embeddings, and its last entry is the
*final-norm* output on most models, not the last layer's residual stream. Only the layers asked for
are kept. The hooks are removed when the ``with`` block ends, before any backward, so gradient
checkpointing's recomputation does not fire them again (transformers checkpoints a layer's
``forward`` inside its ``__call__``, so hooks see the real, differentiable output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from distill.models.decoder import UnsupportedModelError, decoder_of

__all__ = ["catch_layer_outputs", "decoder_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of layers (``model.model.layers`` for Llama, Qwen2/3, Mistral, Gemma, ...)."""
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"Cannot find the decoder layers of {type(decoder).__name__} (a `layers` ModuleList); intermediate-layer "
            "distillation needs them. Set hidden_loss_weight=0."
        )
    return layers


def _layer_output(output: object) -> Tensor:
    # transformers 5 decoder layers return the hidden states; older ones (and some models) a tuple starting with them.
    return output if isinstance(output, Tensor) else output[0]  # type: ignore[index]


@contextmanager
def catch_layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the block, every forward of ``model`` records the ``[batch, seq, H]`` outputs of ``layers``.

    Args:
        model: a causal LM, or a peft / DDP / FSDP / DeepSpeed wrapper of one.
        layers: decoder layer indices (0-based) whose outputs to keep; empty: no hooks, nothing kept.

    Yields:
        ``{layer index: output}``, filled by the forward run inside the block (the last forward wins
        when there are several).
    """
    caught: dict[int, Tensor] = {}
    if not layers:
        yield caught
        return
    modules = decoder_layers(model)
    if max(layers) >= len(modules) or min(layers) < 0:
        raise ValueError(f"Layer indices must be in [0, {len(modules)}); got {sorted(layers)}.")

    def catcher(index: int):  # noqa: ANN202 - a hook factory
        def catch(module: nn.Module, args: object, output: object) -> None:
            caught[index] = _layer_output(output)

        return catch

    handles = [modules[index].register_forward_hook(catcher(index)) for index in sorted(set(layers))]
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()

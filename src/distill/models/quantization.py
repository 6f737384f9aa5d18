"""bitsandbytes 4-bit and 8-bit loading, and keeping a trainable 4-bit model trainable on a CPU.

bitsandbytes is an optional extra (``pip install 'distill[quant]'``). Nothing here imports it at module
import time: quantized layers are recognised by class name, so :func:`is_quantized` and
:func:`make_trainable_4bit_safe` answer ``False`` / ``0`` on a machine without it.

The CPU trap (bitsandbytes 0.50 on a CPU with AVX512-BF16): the first time a ``Linear4bit`` runs in
eval mode on an input that does not require grad (``generate()``, an eval loop under ``no_grad``), it
repacks its weight into a layout for a fast inference kernel (``gemv_4bit``) that has no backward.
From then on the layer passes no gradient to its input, even in train mode: LoRA adapters below the
first 4-bit layer silently stop learning (PyTorch only warns that ``gemv_4bit`` has no autograd
kernel). :func:`make_trainable_4bit_safe` turns the repacking off and undoes it where it already
happened. A frozen 4-bit teacher keeps the fast path: it never needs gradients.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

__all__ = ["QUANT_EXTRA_HINT", "Quantization", "is_quantized", "make_trainable_4bit_safe", "quantization_config"]

Quantization = Literal["none", "4bit", "8bit"]

QUANT_EXTRA_HINT = "pip install 'distill[quant]'"

# Class names of the bitsandbytes layers that hold quantized weights (subclasses such as LinearNF4 match
# through their MRO). peft's LoRA wrappers reuse the name "Linear4bit", so the defining module is checked too.
_BNB_4BIT = frozenset({"Linear4bit"})
_BNB_8BIT = frozenset({"Linear8bitLt"})


def _is_bnb_layer(module: nn.Module, names: frozenset[str]) -> bool:
    return any(cls.__name__ in names and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


def _require_bitsandbytes(quantization: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed: {QUANT_EXTRA_HINT}"
        )


def quantization_config(quantization: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """Build the ``BitsAndBytesConfig`` for a quantization choice.

    Args:
        quantization: ``"none"``, ``"4bit"`` (QLoRA's NF4 with double quantization) or ``"8bit"``
            (LLM.int8()).
        compute_dtype: dtype the 4-bit layers dequantize to for their matmuls (ignored for 8-bit).

    Returns:
        ``None`` for ``"none"``, else a config to pass as ``quantization_config`` to ``from_pretrained``.

    Raises:
        ValueError: an unknown ``quantization``.
        ImportError: bitsandbytes is not installed; the message names the extra to install.
    """
    if quantization not in get_args(Quantization):
        raise ValueError(f"quantization must be one of {get_args(Quantization)}, got {quantization!r}")
    if quantization == "none":
        return None
    _require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # NF4 + double quantization is the QLoRA recipe (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314):
    # ~0.4 bit/parameter less than plain NF4 for the same quality.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit or 8-bit weights (also through a peft wrapper).

    Args:
        model: any module; bitsandbytes need not be installed.

    Returns:
        ``True`` when a ``Linear4bit``/``Linear8bitLt`` is inside or transformers marks the model as
        loaded in 4-bit/8-bit.
    """
    if getattr(model, "is_loaded_in_4bit", False) is True or getattr(model, "is_loaded_in_8bit", False) is True:
        return True
    return any(_is_bnb_layer(module, _BNB_4BIT | _BNB_8BIT) for module in model.modules())


def _unpack_cpu_inference_layout(layer: nn.Module) -> None:
    """Undo the AVX512-BF16 inference repacking of one ``Linear4bit`` so that it has a backward again."""
    from bitsandbytes import functional as bnb_functional

    unpack = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        warnings.warn(
            f"{type(layer).__name__} weights are in bitsandbytes' CPU inference layout and this bitsandbytes "
            "cannot convert them back: gradients will not flow through this layer. Load the model again and "
            "call make_trainable_4bit_safe before any eval-mode forward.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    # Best effort: the repacking rounded the block scales (absmax) to bf16, so weights may differ by that rounding.
    layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, layer.weight.quant_state)


def make_trainable_4bit_safe(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` in ``model`` differentiable after eval-mode calls on a CPU.

    Sets ``support_avx512bf16_for_cpu = False`` on each layer so it never switches to the inference-only
    CPU layout (see the module docstring), and converts back any layer that already switched. Call it
    on a trainable 4-bit student before its first eval-mode forward (:func:`apply_peft` does); never
    needed for a frozen teacher. Harmless on CUDA, where the flag is not consulted.

    Args:
        model: any module; without bitsandbytes layers this does nothing.

    Returns:
        How many ``Linear4bit`` layers were found (0 without bitsandbytes or 4-bit layers).
    """
    count = 0
    for module in model.modules():
        if not _is_bnb_layer(module, _BNB_4BIT):
            continue
        module.support_avx512bf16_for_cpu = False
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            _unpack_cpu_inference_layout(module)
        count += 1
    return count

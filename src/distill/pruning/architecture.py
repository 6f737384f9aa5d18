"""What structured pruning can cut in a Llama-family decoder, and how many parameters a shape has.

Supported: decoders laid out as Llama's (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, RMSNorms before attention and MLP, a final norm, an embedding and a
head, tied or not): Llama 2/3, Qwen2/2.5, Qwen3 (per-head q/k norms), Mistral, SmolLM. Biases on
q/k/v (Qwen2) and ``attention_bias`` / ``mlp_bias`` are sliced with their weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

__all__ = ["PruneShape", "UnsupportedArchitectureError", "check_prunable", "count_parameters", "shape_of"]

# model_type values whose decoder layers have exactly the module layout below.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


class UnsupportedArchitectureError(ValueError):
    """The model is not a decoder this pruner can cut into a standard, smaller model of the same class."""


@dataclass(frozen=True)
class PruneShape:
    """A decoder's prunable dimensions.

    Attributes:
        num_layers: decoder layers kept.
        hidden_size: residual-stream (embedding) channels.
        num_attention_heads: query heads (a multiple of ``num_key_value_heads``).
        num_key_value_heads: key/value heads (GQA groups).
        intermediate_size: MLP neurons per layer.
        head_dim: channels per head (never pruned; kept to write it into the config).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, heads {self.num_attention_heads}/"
            f"{self.num_key_value_heads} kv, MLP {self.intermediate_size}"
        )


def _config_head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def shape_of(config: Any) -> PruneShape:
    """The :class:`PruneShape` of a model config."""
    return PruneShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        head_dim=_config_head_dim(config),
    )


def count_parameters(config: Any, shape: PruneShape | None = None) -> dict[str, int]:
    """Parameters of ``config``'s model at ``shape`` (default: its own), split into embedding and the rest.

    Returns:
        ``{"embedding": ..., "non_embedding": ..., "total": ...}``; the embedding part counts the input
        embedding and, when untied, the output head.
    """
    s = shape or shape_of(config)
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attention = s.hidden_size * (2 * q + 2 * kv)
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attention += q + 2 * kv + (s.hidden_size if getattr(config, "attention_bias", False) else 0)
    if config.model_type == "qwen3":
        attention += 2 * s.head_dim  # q_norm, k_norm
    mlp = 3 * s.hidden_size * s.intermediate_size
    if getattr(config, "mlp_bias", False):
        mlp += 2 * s.intermediate_size + s.hidden_size
    per_layer = attention + mlp + 2 * s.hidden_size  # two RMSNorms
    non_embedding = s.num_layers * per_layer + s.hidden_size  # + final norm
    tied = getattr(config, "tie_word_embeddings", False)
    embedding = config.vocab_size * s.hidden_size * (1 if tied else 2)
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` (the list of decoder layers) of a supported causal LM."""
    return model.model.layers  # type: ignore[return-value]


def check_prunable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless ``model`` has the layout this pruner cuts.

    Checked before any calibration work: the model type, the module names of every layer, plain
    (unquantized, un-wrapped) linear layers.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"Structured pruning supports Llama-family decoders ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}); "
            f"got model_type={model_type!r}. Pass one of those (SmolLM is llama), or use "
            "distill.models.student_from_teacher to copy a subset of layers."
        )
    if (
        hasattr(model, "peft_config")
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
    ):
        raise UnsupportedArchitectureError(
            "Prune the plain model: load it unquantized (bf16 or fp32) and without LoRA adapters, prune, "
            "then quantize or add adapters to the pruned student."
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no model.layers list of decoder layers.")
    for index, layer in enumerate(layers):
        for path in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ):  # fmt: skip
            module = layer.get_submodule(path) if _has(layer, path) else None
            if type(module) is not nn.Linear:
                raise UnsupportedArchitectureError(
                    f"Layer {index} of {type(model).__name__} has no plain nn.Linear at {path} "
                    f"(found {type(module).__name__}); structured pruning needs the standard Llama layout."
                )
        for path in ("input_layernorm", "post_attention_layernorm"):
            if not _has(layer, path):
                raise UnsupportedArchitectureError(f"Layer {index} has no {path}.")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise UnsupportedArchitectureError("Mixture-of-experts models are not supported by structured pruning.")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True

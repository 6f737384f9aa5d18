"""Model shapes for planning: read from a Hugging Face ``config.json`` (no weights) or from a built-in catalogue.

Covers dense decoder-only transformers in the Llama family: Llama, Mistral, Qwen2 / Qwen2.5 (biases
on the q/k/v projections), Qwen3 (per-head q/k norms, explicit ``head_dim``), SmolLM2. Each decoder
layer is an RMSNorm, grouped-query attention (q, k, v, o projections), an RMSNorm and a gated MLP
(gate, up, down projections); then a final norm and an LM head (tied to the embedding or not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distill.checks import InputError, check_int

__all__ = ["KNOWN_MODELS", "ModelSpec", "model_spec", "spec_from_config"]


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only causal LM, enough to count its parameters, FLOPs and activations.

    Attributes:
        name: a label (the hub id for catalogue entries).
        hidden_size: model width ``H``.
        intermediate_size: MLP width ``I``.
        num_layers: decoder layers ``L``.
        num_heads: attention (query) heads.
        num_kv_heads: key/value heads (fewer than ``num_heads``: grouped-query attention).
        head_dim: width of one head (``H / num_heads`` unless the config says otherwise, as Qwen3's does).
        vocab_size: rows of the embedding and the LM head ``V``.
        tie_word_embeddings: the head shares the embedding matrix.
        qkv_bias: biases on the q/k/v projections (Qwen2).
        o_bias: a bias on the output projection (Llama's ``attention_bias``).
        mlp_bias: biases on the MLP projections.
        qk_norm: RMSNorms on each query and key head (Qwen3).
        published_params: the parameter count the model card states, if known (for checking).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    published_params: float | None = field(default=None, compare=False)

    @property
    def q_dim(self) -> int:
        """Width of all query heads together, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together, ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(in_features, out_features)`` of the 7 projections of one layer: q, k, v, o, gate, up, down."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's 7 projections (the part QLoRA quantizes), biases excluded."""
        return sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes())

    @property
    def layer_other_params(self) -> int:
        """One layer's parameters outside the projection weights: norms and biases."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        count = 2 * h
        count += (q + 2 * kv) if self.qkv_bias else 0
        count += h if self.o_bias else 0
        count += (2 * i + h) if self.mlp_bias else 0
        count += 2 * self.head_dim if self.qk_norm else 0
        return count

    @property
    def embedding_params(self) -> int:
        """The input embedding, ``V * H``."""
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's own parameters: ``V * H``, or 0 when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params(self) -> int:
        """All layers' projection weights, ``L * layer_linear_params``."""
        return self.num_layers * self.layer_linear_params

    @property
    def other_params(self) -> int:
        """Everything not in a projection weight, the embedding or the head: norms, biases, the final norm."""
        return self.num_layers * self.layer_other_params + self.hidden_size

    @property
    def num_params(self) -> int:
        """Total parameters, each tensor counted once (a tied head is not counted twice)."""
        return self.linear_params + self.other_params + self.embedding_params + self.head_params

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: the projections and the head (tied or not).

        The embedding is a lookup, not a matmul, so it costs no FLOPs.
        """
        return self.linear_params + self.vocab_size * self.hidden_size

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of LoRA rank ``rank`` on all 7 projections of every layer: ``r * (in + out)`` each."""
        return self.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.linear_shapes())


def spec_from_config(config: Mapping[str, Any], name: str = "config") -> ModelSpec:
    """A :class:`ModelSpec` from the keys of a Hugging Face ``config.json`` (already parsed).

    Reads ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads`` (default: ``num_attention_heads``), ``head_dim`` (default:
    ``hidden_size / num_attention_heads``), ``vocab_size``, ``tie_word_embeddings`` (default False),
    ``attention_bias``, ``mlp_bias`` and ``model_type`` (``qwen2``: q/k/v biases; ``qwen3``: q/k norms).
    A multimodal config's ``text_config`` is used when the top level has no ``hidden_size``.

    Raises:
        ValueError: a key is missing, or the model is a mixture of experts (not modelled).
    """
    if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    if any(key in config for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"{name} is a mixture-of-experts model; the planner models dense transformers only.")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if config.get(key) is None]
    if missing:
        raise ValueError(f"{name} lacks {', '.join(missing)}: not a Llama/Qwen/Mistral-style config.json.")
    for key in (*required, "num_key_value_heads", "head_dim"):
        if config.get(key) is not None:
            check_int(config[key], f"{name}'s {key}")  # a positive whole number, or the plan is meaningless
    model_type = str(config.get("model_type", "")).lower()
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    attention_bias = bool(config.get("attention_bias", False))
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2's attention always has q/k/v biases; its config has no key for them.
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def _entry(
    name: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
    published: float, *, head_dim: int | None = None, qkv_bias: bool = False, qk_norm: bool = False,
) -> ModelSpec:  # fmt: skip
    return ModelSpec(
        name, hidden, intermediate, layers, heads, kv_heads, head_dim or hidden // heads, vocab, tied,
        qkv_bias=qkv_bias, qk_norm=qk_norm, published_params=published,
    )  # fmt: skip


def _qwen25(name: str, *shape: Any) -> ModelSpec:
    return _entry(name, *shape, qkv_bias=True)


def _qwen3(name: str, *shape: Any) -> ModelSpec:
    return _entry(name, *shape, head_dim=128, qk_norm=True)


# The shapes published in each model's config.json; the last number is the model card's parameter count.
_CATALOGUE: tuple[ModelSpec, ...] = (
    _qwen25("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, 0.49e9),
    _qwen25("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 1.54e9),
    _qwen25("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True, 3.09e9),
    _qwen25("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, 7.61e9),
    _qwen25("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, 14.7e9),
    _qwen25("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, 32.5e9),
    _qwen25("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False, 72.7e9),
    _qwen3("Qwen/Qwen3-0.6B", 1024, 3072, 28, 16, 8, 151936, True, 0.6e9),
    _qwen3("Qwen/Qwen3-1.7B", 2048, 6144, 28, 16, 8, 151936, True, 1.7e9),
    _qwen3("Qwen/Qwen3-4B", 2560, 9728, 36, 32, 8, 151936, True, 4.0e9),
    _qwen3("Qwen/Qwen3-8B", 4096, 12288, 36, 32, 8, 151936, False, 8.2e9),
    _qwen3("Qwen/Qwen3-14B", 5120, 17408, 40, 40, 8, 151936, False, 14.8e9),
    _qwen3("Qwen/Qwen3-32B", 5120, 25600, 64, 64, 8, 151936, False, 32.8e9),
    _entry("meta-llama/Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128256, True, 1.24e9, head_dim=64),
    _entry("meta-llama/Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, True, 3.21e9),
    _entry("meta-llama/Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, 8.03e9),
    _entry("meta-llama/Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False, 70.6e9),
    _entry("mistralai/Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False, 7.25e9),
    _entry("HuggingFaceTB/SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True, 134.5e6),
    _entry("HuggingFaceTB/SmolLM2-360M", 960, 2560, 32, 15, 5, 49152, True, 362e6),
    _entry("HuggingFaceTB/SmolLM2-1.7B", 2048, 8192, 24, 32, 32, 49152, True, 1.71e9),
)
# Qwen2.5-Coder shares the Qwen2.5 shapes size for size (same config numbers, same parameter counts).
_CODER = tuple(
    replace(spec, name=spec.name.replace("Qwen2.5-", "Qwen2.5-Coder-"))
    for spec in _CATALOGUE
    if spec.name.startswith("Qwen/Qwen2.5-") and not spec.name.endswith("72B")
)
KNOWN_MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (*_CATALOGUE, *_CODER)}

# Fine-tuned variants have the base model's shape.
_VARIANT_SUFFIXES = ("-instruct", "-it", "-chat", "-base")


def _normalise(name: str) -> str:
    short = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in _VARIANT_SUFFIXES:
        short = short.removesuffix(suffix)
    return short


def model_spec(source: str | os.PathLike | Mapping[str, Any] | ModelSpec) -> ModelSpec:
    """The shape of a model given by catalogue name, ``config.json`` path or folder, or parsed config.

    Args:
        source: a :class:`ModelSpec` (returned as is); a mapping (a parsed ``config.json``); a path to a
            ``config.json`` or to a folder holding one (a ``save_pretrained`` folder); or a catalogue
            name such as ``"Qwen/Qwen2.5-Coder-14B"`` (the organisation and an ``-Instruct`` suffix may
            be left off). Only ``config.json`` is read, never weights.

    Returns:
        The :class:`ModelSpec`.

    Raises:
        KeyError: a name that is neither a file nor in :data:`KNOWN_MODELS`.
        ValueError: a config the planner cannot model (see :func:`spec_from_config`).
    """
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, Mapping):
        return spec_from_config(source, name=str(source.get("_name_or_path") or "config"))
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as error:
            raise InputError(f"{path} is not valid JSON ({error}): give a model's config.json.") from None
        if not isinstance(config, Mapping):
            raise InputError(f"{path} holds a JSON {type(config).__name__}, not a config.json object.")
        label = path.parent.name if path.name == "config.json" else str(path)
        try:
            return spec_from_config(config, name=label)
        except (TypeError, ValueError) as error:
            raise InputError(f"{path}: {error}") from None
    wanted = _normalise(os.fspath(source))
    for name, spec in KNOWN_MODELS.items():
        if _normalise(name) == wanted:
            return spec
    raise KeyError(
        f"{os.fspath(source)!r} is not a config.json, a folder holding one, or a known model. Known: "
        f"{', '.join(KNOWN_MODELS)}. For another model pass the path of its config.json."
    )

"""Importance of every prunable unit, measured on calibration rows in one batched pass (Minitron-style).

One forward pass of the teacher over calibration batches, with hooks, accumulates (over real,
non-padding tokens only):

* **MLP neurons** ``[layers, intermediate]``: the energy each neuron sends to the residual stream,
  ``E[a_j^2] * ||W_down[:, j]||^2`` (``a`` = the down projection's input, ``act(gate) * up``).
* **attention heads** ``[layers, heads]``: the same for each head, ``E||W_o[:, h] a_h||^2``.
* **hidden channels** ``[hidden]``: mean ``|RMSNorm output|`` summed over every norm (Minitron's
  embedding-channel score, arXiv 2407.14679 section 2.1).
* **blocks** ``[layers]``: angular distance ``arccos(cos(x_in, x_out)) / pi`` between a layer's input and
  output (Gromov et al., arXiv 2403.17887): near 0 means the block barely changes the stream. Optionally
  also the calibration loss increase when the block is skipped (one extra pass per block).
* **Gram matrices** of the inputs of every linear map whose inputs can be pruned (attention and MLP
  inputs after their norms, the o and down projections' inputs) and per-channel residual energy at
  every norm: what :mod:`distill.pruning.surgery` needs to re-fit the kept weights by least squares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.pruning.architecture import check_prunable, decoder_layers, shape_of

__all__ = ["Importance", "measure_importance"]


@dataclass
class _Moments:
    """Running sums over tokens: ``sum |y|``, ``sum y^2`` per channel, and optionally ``sum y y^T``."""

    abs_sum: Tensor
    sq_sum: Tensor
    gram: Tensor | None
    tokens: int = 0

    @classmethod
    def zeros(cls, width: int, gram: bool, device: torch.device, dtype: torch.dtype) -> _Moments:
        gram_t = torch.zeros(width, width, device=device, dtype=dtype) if gram else None
        zeros = torch.zeros(width, device=device, dtype=dtype)
        return cls(zeros, zeros.clone(), gram_t)

    def add(self, rows: Tensor) -> None:
        rows = rows.to(self.sq_sum.dtype)
        self.abs_sum += rows.abs().sum(0)
        self.sq_sum += rows.square().sum(0)
        if self.gram is not None:
            self.gram.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def mean_sq(self) -> Tensor:
        return self.sq_sum / max(self.tokens, 1)

    def mean_gram(self) -> Tensor:
        assert self.gram is not None
        return self.gram / max(self.tokens, 1)


@dataclass
class Importance:
    """Calibration statistics of a teacher, enough to rank units and to re-fit pruned weights.

    Attributes:
        neurons: ``[layers, intermediate]`` MLP neuron scores (higher = keep).
        heads: ``[layers, heads]`` attention (query) head scores.
        channels: ``[hidden]`` residual-stream channel scores.
        block_distance: ``[layers]`` angular distance between each block's input and output, in [0, 1].
        block_skip_loss: ``[layers]`` calibration CE (nats/token) with the block skipped, or ``None``.
        base_loss: calibration CE of the unpruned model (nats/token).
        tokens: calibration tokens seen.
        moments: per-site statistics keyed ``"{layer}.attn_in"``, ``"{layer}.mlp_in"``, ``"{layer}.o_in"``,
            ``"{layer}.down_in"`` (inputs of linear maps), ``"{layer}.res_attn"``, ``"{layer}.res_mlp"``,
            ``"final.res"`` (residual stream at each norm's input) and ``"final.out"``.
    """

    neurons: Tensor
    heads: Tensor
    channels: Tensor
    block_distance: Tensor
    block_skip_loss: Tensor | None
    base_loss: float
    tokens: int
    moments: dict[str, _Moments] = field(repr=False)


class _Collector:
    """Forward hooks that fill :class:`_Moments` for one model, restricted to the current batch's real tokens."""

    def __init__(
        self, model: nn.Module, grams: bool, dtype: torch.dtype, gram_layers: set[int], only_grams: bool = False
    ) -> None:
        self.model, self.dtype = model, dtype
        self.mask: Tensor | None = None
        self.moments: dict[str, _Moments] = {}
        layers = decoder_layers(model)
        self.distance_sum = torch.zeros(len(layers), dtype=torch.float64)
        self.handles: list[Any] = []
        for index, layer in enumerate(layers):
            gram = grams and index in gram_layers
            if only_grams and not gram:
                continue
            attn, mlp = layer.self_attn, layer.mlp
            self._watch_output(layer.input_layernorm, f"{index}.attn_in", gram=gram)
            self._watch_output(layer.post_attention_layernorm, f"{index}.mlp_in", gram=gram)
            self._watch_input(attn.o_proj, f"{index}.o_in", gram=gram)
            self._watch_input(mlp.down_proj, f"{index}.down_in", gram=gram)
            if not only_grams:
                self._watch_input(layer.input_layernorm, f"{index}.res_attn", gram=False)
                self._watch_input(layer.post_attention_layernorm, f"{index}.res_mlp", gram=False)
                self.handles.append(layer.register_forward_hook(self._distance_hook(index)))
        if not only_grams:
            self._watch_input(model.model.norm, "final.res", gram=False)
            self._watch_output(model.model.norm, "final.out", gram=False)

    def _rows(self, tensor: Tensor) -> Tensor:
        flat = tensor.reshape(-1, tensor.shape[-1])
        return flat if self.mask is None else flat[self.mask]

    def _site(self, name: str, width: int, gram: bool, device: torch.device) -> _Moments:
        if name not in self.moments:
            self.moments[name] = _Moments.zeros(width, gram, device, self.dtype)
        return self.moments[name]

    def _watch_input(self, module: nn.Module, name: str, gram: bool) -> None:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            rows = self._rows(args[0].detach())
            self._site(name, rows.shape[-1], gram, rows.device).add(rows)

        self.handles.append(module.register_forward_pre_hook(hook))

    def _watch_output(self, module: nn.Module, name: str, gram: bool) -> None:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            rows = self._rows(output.detach())
            self._site(name, rows.shape[-1], gram, rows.device).add(rows)

        self.handles.append(module.register_forward_hook(hook))

    def _distance_hook(self, index: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            inputs = self._rows(_first_tensor(args).detach()).double()
            outputs = self._rows(_first_tensor(output).detach()).double()
            cosine = torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1).clamp(-1.0, 1.0)
            self.distance_sum[index] += (torch.arccos(cosine) / math.pi).sum().cpu()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_tensor(value: Any) -> Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple (transformers versions differ)."""
    return value if isinstance(value, Tensor) else value[0]


def _batch_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[float, int]:
    """Summed next-token CE (nats) over the batch's labelled tokens, and how many tokens that is."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(loss), int((labels != -100).sum())


def calibration_loss(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> float:
    """Mean next-token cross-entropy of ``model`` over the batches' labelled tokens, in nats/token."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            loss, tokens = _batch_loss(model, {k: v.to(device) for k, v in batch.items() if v is not None})
            total, count = total + loss, count + tokens
    return total / max(count, 1)


class _SkipBlock:
    """Context manager: a decoder layer returns its input unchanged (the block is skipped)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __enter__(self) -> None:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            hidden = _first_tensor(args)
            return hidden if isinstance(output, Tensor) else (hidden, *output[1:])

        self.handle = self.layer.register_forward_hook(hook)

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def measure_importance(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    *,
    grams: bool = True,
    skip_loss_batches: int = 0,
    gram_dtype: torch.dtype = torch.float32,
    max_gram_bytes: int | None = None,
    progress: bool = True,
) -> Importance:
    """Score every prunable unit of ``model`` on calibration batches (one forward pass, no gradients).

    Args:
        model: a supported causal LM (see :func:`~distill.pruning.architecture.check_prunable`), unchanged.
        batches: collated calibration batches (``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``).
        grams: also accumulate the input Gram matrices the least-squares re-fit needs
            (``layers * (intermediate^2 + 2 hidden^2 + (heads*head_dim)^2)`` numbers in ``gram_dtype``).
        skip_loss_batches: score blocks also by the calibration loss with each block skipped, on this many
            batches (one extra pass per block); 0 skips it.
        gram_dtype: accumulation dtype of the statistics.
        max_gram_bytes: most Gram-matrix bytes on the model's device at once; more layers than fit are
            collected in further passes (each a forward over the batches) and kept in CPU memory. Default:
            half the free memory of a CUDA device, unlimited on a CPU.
        progress: show a progress bar.
    """
    check_prunable(model)
    if not batches:
        raise ValueError("measure_importance needs at least one calibration batch.")
    device = next(model.parameters()).device
    groups = _gram_groups(model, gram_dtype, max_gram_bytes, device) if grams else [set()]
    was_training = model.training
    model.eval()
    collector = _Collector(model, grams, gram_dtype, groups[0])
    total_loss, total_tokens = _calibration_pass(model, collector, batches, "Calibration", progress)
    for number, group in enumerate(groups[1:], start=2):  # the Gram matrices that did not fit in the first pass
        _offload_grams(collector.moments)
        extra = _Collector(model, grams, gram_dtype, group, only_grams=True)
        _calibration_pass(model, extra, batches, f"Calibration statistics {number}/{len(groups)}", progress)
        for name, site in extra.moments.items():
            collector.moments[name].gram = site.gram
    if len(groups) > 1:
        _offload_grams(collector.moments)
    skip_losses = None
    if skip_loss_batches > 0:
        skip_losses = _skip_losses(model, batches[:skip_loss_batches], progress)
    model.train(was_training)
    return _scores(model, collector, total_loss / max(total_tokens, 1), skip_losses)


def _calibration_pass(
    model: nn.Module, collector: _Collector, batches: list[dict[str, Tensor]], label: str, progress: bool
) -> tuple[float, int]:
    """One no-grad forward over the batches with ``collector``'s hooks; the summed CE and its token count."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=label, unit="batch", disable=not progress):
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}
                collector.mask = batch["attention_mask"].reshape(-1).bool()
                loss, tokens = _batch_loss(model, batch)
                total_loss, total_tokens = total_loss + loss, total_tokens + tokens
    finally:
        collector.remove()
    return total_loss, total_tokens


def _gram_groups(model: nn.Module, dtype: torch.dtype, max_bytes: int | None, device: torch.device) -> list[set[int]]:
    """Layers whose Gram matrices are collected together, each group within ``max_bytes``."""
    shape = shape_of(model.config)
    q = shape.num_attention_heads * shape.head_dim
    per_layer = (shape.intermediate_size**2 + 2 * shape.hidden_size**2 + q**2) * dtype.itemsize
    if max_bytes is None and device.type == "cuda":
        max_bytes = torch.cuda.mem_get_info(device)[0] // 2
    per_group = shape.num_layers if max_bytes is None else max(1, int(max_bytes // per_layer))
    layers = list(range(shape.num_layers))
    return [set(layers[i : i + per_group]) for i in range(0, len(layers), per_group)]


def _offload_grams(moments: dict[str, _Moments]) -> None:
    """Move the accumulated Gram matrices to CPU memory (the device holds the next group's)."""
    for site in moments.values():
        if site.gram is not None:
            site.gram = site.gram.cpu()


def _skip_losses(model: nn.Module, batches: list[dict[str, Tensor]], progress: bool) -> Tensor:
    """``[layers]`` calibration CE with each block skipped in turn."""
    layers = decoder_layers(model)
    losses = []
    for layer in tqdm(layers, desc="Block skip losses", unit="block", disable=not progress):
        with _SkipBlock(layer):
            losses.append(calibration_loss(model, batches))
    return torch.tensor(losses, dtype=torch.float64)


def _scores(model: nn.Module, collector: _Collector, base_loss: float, skip_losses: Tensor | None) -> Importance:
    """Turn the collected moments into unit scores (all on the CPU, float64)."""
    shape = shape_of(model.config)
    moments = collector.moments
    layers = decoder_layers(model)
    neurons, heads = [], []
    for index, layer in enumerate(layers):
        down = layer.mlp.down_proj.weight.detach().double().cpu()
        neurons.append(moments[f"{index}.down_in"].mean_sq().cpu() * down.square().sum(0))
        o_proj = layer.self_attn.o_proj.weight.detach().double().cpu()
        heads.append(_head_energy(moments[f"{index}.o_in"], o_proj, shape.num_attention_heads, shape.head_dim))
    norm_sites = [f"{i}.attn_in" for i in range(len(layers))] + [f"{i}.mlp_in" for i in range(len(layers))]
    channels = sum(moments[name].abs_sum.cpu() / moments[name].tokens for name in norm_sites + ["final.out"])
    tokens = moments["final.out"].tokens
    return Importance(
        neurons=torch.stack(neurons),
        heads=torch.stack(heads),
        channels=channels,
        block_distance=collector.distance_sum / max(tokens, 1),
        block_skip_loss=skip_losses,
        base_loss=base_loss,
        tokens=tokens,
        moments=moments,
    )


def _head_energy(site: _Moments, o_proj: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """``[heads]`` ``E||W_o[:, h] a_h||^2`` per head: exact from the Gram, else the diagonal approximation."""
    scores = []
    for head in range(num_heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        w = o_proj[:, cols]
        if site.gram is not None:
            gram = site.mean_gram().cpu().double()[cols, cols]
            scores.append(torch.einsum("oi,ij,oj->", w, gram, w))
        else:
            scores.append((site.mean_sq().cpu().double()[cols] * w.square().sum(0)).sum())
    return torch.stack(scores)

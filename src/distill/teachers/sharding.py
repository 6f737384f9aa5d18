"""Shard a frozen teacher over the processes of a distributed run (FSDP2), instead of replicating it.

With ``N`` processes each holds ``1/N`` of the teacher's weights; a decoder layer's weights are
all-gathered just before it runs and freed after it, so the teacher's resident memory per GPU drops
from its full size to about ``size / N`` plus one layer. This is independent of how the student is
parallelised (DDP, FSDP, DeepSpeed): the teacher only ever runs forward, under ``no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from distill.losses.targets import OutputHead
from distill.models.decoder import _unwrap, decoder_of


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} (model.model.layers) to shard.")
    return list(layers)


def shard_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with ``torch.distributed.fsdp.fully_shard``: each decoder layer, then the rest.

    Pass the teacher still on the CPU: ``fully_shard`` moves one group's tensors to ``device`` at a time
    (a decoder layer, then the embeddings / head / norm), keeps this process's ``1/N`` and lets the rest go,
    so the GPU never holds the whole teacher (a teacher moved to the GPU first would need its full size
    there, on every GPU, at start-up). Parameters on the meta device stay there (see :func:`fill_shards_from`).

    Args:
        model: the frozen teacher, on the CPU (or already on ``device``, or on meta).
        device: this process's device (its rank's GPU, or the CPU with gloo); the mesh spans every process of
            the default process group.

    Returns:
        The same model object, now holding DTensor shards.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("teacher_sharding='fsdp' needs a distributed run (accelerate launch / torchrun).")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor shard (an FSDP2 parameter outside its forward)."""
    return type(tensor).__name__ == "DTensor"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` gathered whole if it is a DTensor shard, else itself: for frozen (teacher) weights only.

    Not for a trained weight: ``full_tensor()``'s backward is a local slice, so each shard would learn
    from its own rank's tokens only (no reduce-scatter), and its dtype is the fp32 shard's, not the
    compute dtype. Use :func:`student_weight` inside :func:`head_unsharded_through_loss` instead.
    """
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def student_weight(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A trained head weight / bias for the fused loss: the plain unsharded tensor FSDP2 registered.

    Raises:
        RuntimeError: it is still a DTensor shard (the model was not run inside
            :func:`head_unsharded_through_loss`, or is sharded in a way it does not know).
    """
    if tensor is not None and is_sharded(tensor) and tensor.requires_grad:
        raise RuntimeError(
            "The student's output head is an FSDP2 shard at loss time: gathering it would train each shard on one "
            "rank's tokens only. Run the student inside distill.teachers.sharding.head_unsharded_through_loss, or "
            "set loss_implementation='dense'."
        )
    return tensor


def student_head(head: OutputHead) -> OutputHead:
    """The student's output head for the fused loss: its weight and bias through :func:`student_weight`."""
    return OutputHead(student_weight(head.weight), student_weight(head.bias), head.softcap)  # type: ignore[arg-type]


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The decoder's final norm (``model.model.norm`` for Llama / Qwen / Gemma), if it has one by that name."""
    try:
        decoder = decoder_of(model)
    except ValueError:
        return None
    norm = getattr(decoder, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def _owning_fsdp_modules(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """For each of ``modules``: the nearest FSDP2 module at or above it in ``model`` (whose group holds its
    parameters); each owner once."""
    from torch.distributed.fsdp import FSDPModule

    named = dict(model.named_modules())
    names = {id(module): name for name, module in named.items()}
    owners: list[nn.Module] = []
    for module in modules:
        name = names.get(id(module))
        if name is None:
            continue
        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):
            candidate = named[".".join(parts[:depth])]
            if isinstance(candidate, FSDPModule):
                if all(candidate is not owner for owner in owners):
                    owners.append(candidate)
                break
    return owners


@contextlib.contextmanager
def head_unsharded_through_loss(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 student's output head and final norm unsharded from its forward until its backward.

    The fused loss reads the head weight directly and takes the final hidden states from inside the
    decoder, not from the model's output. If the FSDP group holding the head (and the final norm) were
    resharded after forward, as ``reshard_after_forward=True`` on the root does (accelerate before 1.13
    passes it; torch honours it since 2.8), the head would be a DTensor shard of the fp32 master weights
    (a dtype mismatch under bf16 mixed precision, and ``full_tensor()`` would give each shard the
    gradient of one rank's tokens), and the norm's freed weight would be read by the backward (the
    root's pre-backward hook, on its logits, never fires). Inside this block those groups keep their
    compute-dtype parameters after the forward; FSDP reshards them after the backward and reduce-scatters
    their gradients as usual (its final backward callback runs the post-backward of groups whose
    forward inputs need no gradient). A model without FSDP2 is left alone.
    """
    if not any(is_sharded(param) for param in model.parameters()):
        yield
        return
    inner = _unwrap(model)
    modules = [m for m in (inner.get_output_embeddings(), _final_norm(model)) if m is not None]
    saved = []
    for owner in _owning_fsdp_modules(model, modules):
        for group in owner._get_fsdp_state()._fsdp_param_groups:
            saved.append((group, group.post_forward_mesh_info))
            group.post_forward_mesh_info = None  # what set_reshard_after_forward(False) sets: keep unsharded
    try:
        yield
    finally:
        for group, mesh_info in saved:
            group.post_forward_mesh_info = mesh_info


def weight_rows(weight: torch.Tensor) -> int:
    """Rows of a (maybe partitioned) weight: DeepSpeed ZeRO-3 leaves a ``(0,)`` placeholder and the full shape in
    ``ds_shape``; an FSDP2 DTensor's ``shape`` is already the full one."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def is_quantized_model(model: nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit / 8-bit weights (FSDP would shard away their quantization state)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return any(type(param).__name__ in ("Params4bit", "Int8Params") for param in model.parameters())


_RAM_EFFICIENT_LOADING = "FSDP_CPU_RAM_EFFICIENT_LOADING"


@contextlib.contextmanager
def loading_whole_on_every_rank() -> Iterator[None]:
    """Load a (teacher) model with real weights on every process, whatever the student's launch config says.

    Under DeepSpeed ZeRO-3 with ``zero3_init_flag`` every ``from_pretrained`` runs inside ``zero.Init`` and
    returns ``(0,)`` placeholders that DeepSpeed never gathers for a model it does not wrap; under
    ``fsdp_cpu_ram_efficient_loading`` only local rank 0 gets real weights and the others are left for
    FSDP to fill, which it does for the student only (a teacher sharded from such copies is garbage, with
    no error). Both switches are read at load time, so the teacher is loaded with them off.
    """
    import os

    from transformers.integrations import deepspeed as hf_deepspeed

    saved_config = hf_deepspeed._hf_deepspeed_config_weak_ref
    saved_env = os.environ.pop(_RAM_EFFICIENT_LOADING, None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved_config
        if saved_env is not None:
            os.environ[_RAM_EFFICIENT_LOADING] = saved_env


def ram_efficient_loading() -> bool:
    """Whether the launch asked for ``fsdp_cpu_ram_efficient_loading`` (only local rank 0 loads real weights)."""
    import os

    return os.environ.get(_RAM_EFFICIENT_LOADING, "").lower() in ("1", "true")


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of ``model``'s parameters as they are now (before :func:`shard_teacher`).

    The tensors keep their storage alive after sharding replaces the parameters: what
    :func:`fill_shards_from` copies from on rank 0. Tied parameters appear once (as ``named_parameters``).
    """
    return {name: param.detach() for name, param in model.named_parameters()}


@torch.no_grad()
def fill_shards_from(model: nn.Module, whole: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Fill every process's shards of a sharded ``model`` with rank 0's ``whole`` weights; buffers likewise.

    For a teacher that holds real weights on rank 0 only (``fsdp_cpu_ram_efficient_loading``: the other
    ranks built it on the meta device, or hold garbage): shard first, then copy. One tensor at a time
    travels from rank 0 (a broadcast of its full size, on ``device``) and each process keeps its dim-0
    chunk, the slice FSDP2 holds; no process other than rank 0 ever holds the whole teacher.

    Args:
        model: the teacher after :func:`shard_teacher` (meta parameters are allocated on ``device`` here).
        whole: on rank 0, :func:`whole_weights` taken before sharding; ignored on the other ranks.
        device: this process's device (broadcasts need it: NCCL moves CUDA tensors only).
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    # Every process must hold the same tensors (names, shapes, dtypes), or the broadcasts below would mismatch;
    # all of them learn it (and whether rank 0 has the weights) from one gather, and raise alike.
    layout = [(name, tuple(param.shape), str(param.dtype)) for name, param in model.named_parameters()]
    layouts: list[object] = [None] * world
    dist.all_gather_object(layouts, (layout, whole is not None))
    if not layouts[0][1]:  # type: ignore[index]
        raise ValueError("fill_shards_from needs rank 0's whole weights (whole_weights(model) before sharding).")
    layouts = [entry[0] for entry in layouts]  # type: ignore[index]
    if any(other != layouts[0] for other in layouts):
        differing = [index for index, other in enumerate(layouts) if other != layouts[0]]
        raise ValueError(
            f"The teacher differs between processes (ranks {differing} against rank 0: parameter names, shapes or "
            "dtypes): load it with the same teacher_dtype everywhere."
        )
    if any(tensor.is_meta for tensor in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)  # FSDP2 re-points its sharded storage; the values come below
    for name, param in model.named_parameters():
        source = whole[name] if rank == 0 and whole is not None else None  # whole is given on rank 0 (checked)
        full = torch.empty(param.shape, dtype=param.dtype, device=device) if source is None else source.to(device)
        dist.broadcast(full, src=0)
        if is_sharded(param):
            local = param.to_local()
            chunks = torch.chunk(full, world, dim=0)  # FSDP2's Shard(0) layout: torch.chunk, the last ranks short
            if local.numel():
                local.copy_(chunks[rank])
        else:
            param.copy_(full)
    for buffer in model.buffers():  # rotary tables and the like: not sharded, small
        on_device = buffer.to(device)
        dist.broadcast(on_device, src=0)
        buffer.copy_(on_device)


def broadcast_from_rank0(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (a teacher object loaded under RAM-efficient loading).

    Raises:
        ValueError: some tensors are on the meta device (nothing to receive them into).
    """
    import torch.distributed as dist

    tensors = list(model.parameters()) + list(model.buffers())
    if any(tensor.is_meta for tensor in tensors):
        raise ValueError(
            "The teacher has weights on the meta device (loaded under fsdp_cpu_ram_efficient_loading on a rank other "
            "than 0?). Pass the teacher as a path (distill loads it whole on every rank), or turn that setting off."
        )
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)

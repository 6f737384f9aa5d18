"""Shard a frozen teacher over the processes of a distributed run (FSDP2), instead of replicating it.

With ``N`` processes each holds ``1/N`` of the teacher's weights; a decoder layer's weights are
all-gathered just before it runs and freed after it, so the teacher's resident memory per GPU drops
from its full size to about ``size / N`` plus one layer. This is independent of how the student is
parallelised (DDP, FSDP, DeepSpeed): the teacher only ever runs forward, under ``no_grad``.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.models.decoder import decoder_of


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} (model.model.layers) to shard.")
    return list(layers)


def shard_teacher(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with ``torch.distributed.fsdp.fully_shard``: each decoder layer, then the rest.

    Args:
        model: the frozen teacher, already on ``device`` (its rank's GPU, or the CPU with gloo).
        device: this process's device; the mesh spans every process of the default process group.

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
    """``tensor`` gathered whole if it is a DTensor shard (differentiable), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor

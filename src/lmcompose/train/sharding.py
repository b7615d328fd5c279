"""Sharded training through torch's FSDP2 (``fully_shard``): the frozen bases' decoder blocks and the connections
split across ranks, each gathered only while it runs.

A composed model holds two (or more) frozen bases and a few million trainable weights. Under ``sharding="fsdp2"``
every decoder block of the anchor and of each augment is its own FSDP unit (all-gathered for its forward, and for
the anchor's backward, then freed), each connection another (its gradients reduce-scattered), and the root unit
holds the rest (embeddings, norms, heads). A rank keeps 1/N of every base tensor between uses.

What the recipe writes stays what a single process writes: the composition and the optimiser state are gathered
to full tensors (every rank takes part, rank 0 writes), and a resumed run scatters them back. The fingerprints
of the bases are read before the model is sharded, when every weight is whole.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..core import introspect


def launched_processes() -> int:
    """The number of processes of this launch (torchrun and accelerate set WORLD_SIZE), known before any process
    group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_sharding(config: Any, processes: int) -> None:
    """Refuse a sharded run that cannot be one: a single process, or a setting the sharded path does not carry.

    Args:
        config: the TrainingConfig.
        processes: the launch's process count.
    """
    if config.sharding == "none":
        return
    if processes < 2:
        raise ValueError("sharding='fsdp2' (--sharding fsdp2) splits the frozen bases across processes, and this launch "
                         "has one: start it with `torchrun --nproc_per_node N` (N >= 2), or leave sharding off")
    if config.mixed_precision != "no":
        raise ValueError("sharding='fsdp2' trains in float32: drop --bf16 (FSDP2's mixed-precision policy is not wired "
                         "in), or train data-parallel without --sharding")
    if config.cache_augment_states:
        raise ValueError("sharding='fsdp2' cannot cache the augments' states (rank 0 would run a sharded augment "
                         "alone): drop --cache-augment-states")


def shard_model(model: Any, device: torch.device, processes: int) -> Any:
    """Shard ``model`` (a ComposedModel, in place) with FSDP2 over ``processes`` ranks on ``device``'s type.

    Units: every decoder block of the anchor and of each augment, every connection (its ``project`` runs outside
    ``forward``, so it is registered as a forward method too), and the root. Returns the model.
    """
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # a connection's output is a view (its out projection's); the composition only ever adds it out of place
    # (hooks.residual_updates), which keeps FSDP2's backward hook, so its warning about in-place ops does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCrossAttention\) returned a view tensor")
    mesh = init_device_mesh(device.type, (processes,))
    for base in (model.anchor, *model.augments):
        for block in introspect.decoder_blocks(base):
            fully_shard(block, mesh=mesh)
    for connections in model.connections:
        for connection in connections:
            fully_shard(connection, mesh=mesh)
            register_fsdp_forward_method(connection, "project")
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a tensor spread over ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(value: Any) -> Any:
    """``value`` (a tensor or a nest of dicts and lists of them) with every DTensor gathered to the full tensor, on
    the CPU. Every rank must call it (the gathers are collectives), in the same order."""
    if is_sharded(value):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {k: full_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tensors(v) for v in value)
    return value


def sharded_optimizer_state(state: dict[str, Any], parameters: list) -> dict[str, Any]:
    """A full optimiser state dict (as :func:`full_tensors` wrote it) with each per-parameter tensor the shape of
    its parameter split as that parameter is, so it loads into an optimiser over the sharded parameters.

    Every rank must call it with the same state (the splits are collectives).
    """
    from torch.distributed.tensor import distribute_tensor

    order = [i for group in state["param_groups"] for i in group["params"]]
    by_index = dict(zip(order, parameters))
    resharded = {}
    for index, values in state["state"].items():
        parameter = by_index[int(index)]
        resharded[index] = {
            k: distribute_tensor(v.to(parameter.device), parameter.device_mesh, parameter.placements)
            if torch.is_tensor(v) and is_sharded(parameter) and tuple(v.shape) == tuple(parameter.shape) else v
            for k, v in values.items()
        }
    return {**state, "state": resharded}


def local_bytes(module: Any) -> int:
    """The bytes of parameters and buffers this rank holds for ``module`` (a shard's local part for a DTensor)."""
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        local = tensor.to_local() if is_sharded(tensor) else tensor
        total += local.numel() * local.element_size()
    return total

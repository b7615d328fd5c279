"""Sharded training through torch's FSDP2 (``fully_shard``): the frozen bases' decoder blocks and the connections
split across ranks, each gathered only while it runs.

A composed model holds two (or more) frozen bases and a few million trainable weights. Under ``sharding="fsdp2"``
every decoder block of the anchor and of each augment is its own FSDP unit (all-gathered for its forward, and for
the anchor's backward, then freed), each connection another (its gradients reduce-scattered), and the root unit
holds the rest (embeddings, norms, heads). A rank keeps 1/N of every base tensor between uses.

What the recipe writes stays what a single process writes: the composition and the optimiser state are gathered
to full tensors (every rank takes part, rank 0 writes), and a resumed run scatters them back.

Only rank 0 needs the bases whole. The other ranks may build them empty (``io.bases.load_base(empty=True)``:
parameters on the meta device, no weight read), as ``lmcompose train --sharding fsdp2`` does: the bases'
fingerprints are read on rank 0 and broadcast, and as the model is sharded each empty rank receives its part of
every tensor from rank 0, one tensor at a time (torch's ``set_model_state_dict`` with ``broadcast_from_rank0``).
A rank other than 0 then never holds more than its shard and one tensor in flight.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

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
    name = f"sharding={config.sharding!r}"
    if processes < 2:
        raise ValueError(f"{name} (--sharding {config.sharding}) splits the frozen bases across processes, and this "
                         "launch has one: start it with `torchrun --nproc_per_node N` (N >= 2), or leave sharding off")
    if config.mixed_precision != "no":
        raise ValueError(f"{name} trains in float32: drop --bf16 (mixed precision is not wired into the sharded "
                         "paths), or train data-parallel without --sharding")
    if config.cache_augment_states:
        raise ValueError(f"{name} cannot cache the augments' states (rank 0 would run a sharded augment alone): drop "
                         "--cache-augment-states")
    if config.cache_anchor_states:
        raise ValueError(f"{name} cannot cache the anchor's states (its lower blocks are sharded): drop "
                         "--cache-anchor-states")
    if config.sharding == "zero3":
        from .zero3 import check_available

        check_available()


def bases_empty(model: Any) -> bool:
    """Whether every parameter of ``model``'s bases is on the meta device, built empty to be filled from rank 0;
    refuses a model whose bases are some empty and some whole (a rank holds all of them one way)."""
    bases = {"the anchor": model.anchor, **{f"augment {a}": augment for a, augment in enumerate(model.augments)}}
    empty = {name: getattr(base, introspect.EMPTY_ON, None) is not None
             and all(p.device.type == "meta" for p in base.parameters()) for name, base in bases.items()}
    if len(set(empty.values())) > 1:
        built = ", ".join(f"{name} {'empty' if is_empty else 'whole'}" for name, is_empty in empty.items())
        raise ValueError(f"a rank holds its bases some empty and some whole ({built}): load every base of a rank "
                         "the same way, with load_base(empty=True) on ranks but 0 or whole")
    return all(empty.values())


def _empty_ranks(model: Any) -> list[bool]:
    """Per rank, whether it holds the bases empty; refuses a rank 0 that does (it is where they are read)."""
    import torch.distributed as dist

    empty = [False] * dist.get_world_size()
    dist.all_gather_object(empty, bases_empty(model))
    if empty[0]:
        raise ValueError("rank 0 of a sharded run holds the bases empty (load_base(empty=True)), and the other ranks "
                         "are filled from its weights: load them whole on rank 0")
    return empty


def main_rank_metadata(model: Any, read: Callable[[Any], dict[str, Any]],
                       refuse_empty: Optional[Callable[[str], str]] = None) -> dict[str, Any]:
    """``read(model)`` (the composition's JSON, fingerprints of the bases included) as rank 0 computes it, on every
    rank: the other ranks may hold the bases empty. Every rank must call it.

    Args:
        refuse_empty: for a layout that needs the bases whole on every rank, the refusal's message of who built them
            empty: then every rank refuses a launch in which some rank did, naming those ranks (not only the empty
            ranks, which would leave the others waiting in a collective).
    """
    import torch.distributed as dist

    empty = _empty_ranks(model)
    if refuse_empty is not None and any(empty):
        raise ValueError(refuse_empty("rank(s) " + ", ".join(str(r) for r, is_empty in enumerate(empty) if is_empty)))
    box = [read(model) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: Any, device: torch.device, processes: int) -> Any:
    """Shard ``model`` (a ComposedModel, in place) with FSDP2 over ``processes`` ranks on ``device``'s type.

    Units: every decoder block of the anchor and of each augment, every connection (its ``project`` runs outside
    ``forward``, so it is registered as a forward method too), and the root. Ranks holding the bases empty
    (:func:`bases_empty`) get their shards from rank 0's whole bases. Returns the model.
    """
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # a connection's output is a view (its out projection's); the composition only ever adds it out of place
    # (hooks.residual_updates), which keeps FSDP2's backward hook, so its warning about in-place ops does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCrossAttention\) returned a view tensor")
    mesh = init_device_mesh(device.type, (processes,))
    empty = _empty_ranks(model)
    bases = (model.anchor, *model.augments)
    # rank 0's whole tensors, kept through sharding (which frees what it does not keep) to fill the empty ranks
    whole = [dict(base.state_dict()) for base in bases] if any(empty) and dist.get_rank() == 0 else None
    for base in bases:
        for block in introspect.decoder_blocks(base):
            fully_shard(block, mesh=mesh)
    for connections in model.connections:
        for connection in connections:
            fully_shard(connection, mesh=mesh)
            register_fsdp_forward_method(connection, "project")
    fully_shard(model, mesh=mesh)
    if any(empty):
        _fill_from_main_rank(bases, whole, device, empty[dist.get_rank()])
    return model


def _fill_from_main_rank(bases: tuple, whole: Optional[list[dict[str, Any]]], device: torch.device,
                         empty: bool) -> None:
    """Every sharded base's parameters set to rank 0's ``whole`` ones, each rank keeping its shards; a rank that
    holds them empty allocates its shards first. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for b, base in enumerate(bases):
        if empty:  # allocate the shards; the buffers the model computed when built (rotary tables) are kept
            buffers = {name: buffer.clone() for name, buffer in base.named_buffers()}
            base.to_empty(device=device)
            for name, buffer in base.named_buffers():
                buffer.copy_(buffers[name])
        set_model_state_dict(base, whole[b] if whole is not None else {}, options=options)


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
        partition = getattr(tensor, "ds_tensor", None)  # a DeepSpeed ZeRO-3 parameter: its partition
        if partition is not None:
            total += partition.numel() * partition.element_size()
            continue
        local = tensor.to_local() if is_sharded(tensor) else tensor
        if local.device.type == "meta":  # built empty: nothing held
            continue
        total += local.numel() * local.element_size()
    return total

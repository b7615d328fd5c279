"""How a composition trains over ranks, one class per ``TrainingConfig.sharding``: what wraps the model and the
optimiser, how a micro-batch's backward and the optimiser step run, and how the composition and the optimiser state
are read as full tensors for a checkpoint and set again on resume. The recipe calls these and never asks which
layout it runs.

- ``"none"`` (:class:`Replicated`): one process, or accelerate's DDP over the connections; every rank holds the
  bases whole.
- ``"fsdp2"`` (:class:`FSDP2`): torch's ``fully_shard`` over the bases' blocks and the connections
  (``train/sharding.py``).
- ``"zero3"`` (:class:`ZeRO3`): DeepSpeed's ZeRO stage 3 partitions every parameter and the optimiser
  (``train/zero3.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional

import torch

from . import engine, sharding, zero3


class Replicated:
    """One process, or DDP over the connections (accelerate): the bases whole on every rank."""

    clips_in_step = False  # True: the optimiser step clips (and computes the gradient norm) itself

    def metadata(self, model: Any, read: Callable[[Any], dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The composition's JSON read before the model is laid out, or None: read from the model when saving."""
        return None

    def wrap(self, accelerator: Any, model: Any) -> Any:
        """The model as the forward runs it, before the composition is restored."""
        return engine.prepare_model(accelerator, model)

    def shard(self, accelerator: Any, model: Any, wrapped: Any) -> Any:
        """After the composition is restored (into whole connections): the model laid out across ranks."""
        return wrapped

    def prepare(self, accelerator: Any, model: Any, wrapped: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                config: Any) -> tuple[Any, Any, Any]:
        """(wrapped model, optimiser, scheduler) as the steps use them."""
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return wrapped, optimizer, scheduler

    def micro_batch(self, accelerator: Any, wrapped: Any, last: bool) -> AbstractContextManager:
        """Around one micro-batch's forward and backward: gradients synchronised at the step's last one only."""
        return nullcontext() if last else accelerator.no_sync(wrapped)

    def backward(self, accelerator: Any, wrapped: Any, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's share of the step's loss (already normalised over the whole step)."""
        accelerator.backward(loss)

    def step(self, wrapped: Any, optimizer: Any) -> Optional[torch.Tensor]:
        """The optimiser step; the gradient norm when the step computed it (``clips_in_step``), else None."""
        optimizer.step()
        return None

    def load_optimizer_state(self, optimizer: Any, parameters: list, state: dict[str, Any]) -> None:
        """Set the optimiser from a checkpoint's state (full tensors, as one process's AdamW holds them)."""
        optimizer.load_state_dict(state)

    def full_composition(self, model: Any) -> dict[str, torch.Tensor]:
        """The composition's weights as full tensors. Every rank must call it."""
        return sharding.full_tensors(model.composition_state_dict())

    def full_optimizer_state(self, optimizer: Any, parameters: list) -> dict[str, Any]:
        """The optimiser state as one process's AdamW holds it, full tensors. Every rank must call it."""
        return sharding.full_tensors(optimizer.state_dict())


class FSDP2(Replicated):
    """torch's FSDP2: each rank keeps 1/N of every base tensor and connection; ranks > 0 may build the bases empty."""

    def metadata(self, model: Any, read: Callable[[Any], dict[str, Any]]) -> Optional[dict[str, Any]]:
        return sharding.main_rank_metadata(model, read)  # rank 0 holds the bases whole

    def wrap(self, accelerator: Any, model: Any) -> Any:
        return model

    def shard(self, accelerator: Any, model: Any, wrapped: Any) -> Any:
        return sharding.shard_model(model, accelerator.device, accelerator.num_processes)

    def load_optimizer_state(self, optimizer: Any, parameters: list, state: dict[str, Any]) -> None:
        # each moment split as its parameter is
        optimizer.load_state_dict(sharding.sharded_optimizer_state(state, parameters))


class ZeRO3(Replicated):
    """DeepSpeed's ZeRO-3: the model and the recipe's AdamW partitioned; DeepSpeed reduces each micro-batch's
    gradients into its partitions, clips to ``max_grad_norm`` and skips a non-finite step."""

    clips_in_step = True

    def metadata(self, model: Any, read: Callable[[Any], dict[str, Any]]) -> Optional[dict[str, Any]]:
        # before the bases are partitioned; refused on every rank when one built them empty
        return sharding.main_rank_metadata(model, read, refuse_empty=zero3.empty_bases_refused)

    def wrap(self, accelerator: Any, model: Any) -> Any:
        return model

    def prepare(self, accelerator: Any, model: Any, wrapped: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                config: Any) -> tuple[Any, Any, Any]:
        ds_engine, ds_optimizer = zero3.initialize(model, optimizer, config)
        return ds_engine, ds_optimizer, scheduler  # the schedule stays the recipe's

    def micro_batch(self, accelerator: Any, wrapped: Any, last: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, accelerator: Any, wrapped: Any, loss: torch.Tensor, last: bool) -> None:
        zero3.backward(wrapped, loss, last)

    def step(self, wrapped: Any, optimizer: Any) -> Optional[torch.Tensor]:
        wrapped.step()  # clips, steps and zeroes the gradients; skips a non-finite step
        return zero3.grad_norm(wrapped)

    def load_optimizer_state(self, optimizer: Any, parameters: list, state: dict[str, Any]) -> None:
        zero3.load_optimizer_state(optimizer, parameters, state)

    def full_composition(self, model: Any) -> dict[str, torch.Tensor]:
        return zero3.full_composition(model)

    def full_optimizer_state(self, optimizer: Any, parameters: list) -> dict[str, Any]:
        return zero3.full_optimizer_state(optimizer, parameters)


LAYOUTS = {"none": Replicated, "fsdp2": FSDP2, "zero3": ZeRO3}


def layout_for(config: Any) -> Replicated:
    """The layout of ``config.sharding`` (checked by ``sharding.check_sharding`` before a run starts)."""
    return LAYOUTS[config.sharding]()

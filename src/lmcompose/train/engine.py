"""The engine under the recipe: accelerate's Accelerator, data parallelism that skips the frozen bases, and sums
over ranks."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .config import TrainingConfig


def is_main_launch() -> bool:
    """Rank 0 of a distributed launch (accelerate and torchrun set RANK), or a plain run: known before any
    Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def make_accelerator(config: TrainingConfig) -> Any:
    """An Accelerator for this config; accelerate's process-wide state is reset when its precision differs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, config.mixed_precision):
        AcceleratorState._reset_state()  # as transformers' TrainingArguments does between runs
    return Accelerator(
        mixed_precision=config.mixed_precision,
        # the recipe accumulates itself (no_sync on all but a step's last micro-batch), normalising the loss by the
        # target tokens of the whole step; accelerate's own accumulation divides each micro-batch's mean instead
        gradient_accumulation_steps=1,
        cpu=config.cpu,
        # by default accelerate steps the scheduler once per process at each optimiser step, so n processes
        # would run the schedule n times faster; the recipe steps it once per optimiser step instead
        step_scheduler_with_optimizer=False,
    )


def make_optimizer(parameters: list, config: TrainingConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over ``parameters`` and the learning-rate schedule (warmup, then the config's decay) over the run."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


def frozen_names(model: Any) -> list[str]:
    """The names of every parameter and buffer outside the connections: DDP neither broadcasts nor buckets them.

    The bases are frozen and loaded identically on every rank, so only the connections need DDP; without this
    DDP would broadcast the whole anchor at start and its buffers before every forward.
    """
    names = [n for n, _ in model.named_parameters() if not n.startswith("connections.")]
    return names + [n for n, _ in model.named_buffers() if not n.startswith("connections.")]


def prepare_model(accelerator: Any, model: Any) -> Any:
    """``model`` wrapped for the accelerator's launch: as it is on one process, in DDP over the connections only."""
    from torch.nn.parallel import DistributedDataParallel

    kind = str(accelerator.distributed_type.name)
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise NotImplementedError(
            f"train() runs on one process or data-parallel (DDP) processes, not under {kind}: sharding puts part of the "
            "composition and of its optimiser state on each rank, and checkpoints are written from rank 0's view. "
            "Launch with DDP (accelerate launch --multi_gpu or --num_processes N), or shard the bases under torchrun "
            "with torch's FSDP2 (--sharding fsdp2) or DeepSpeed ZeRO-3 (--sharding zero3); see docs/distributed.md"
        )
    ddp = accelerator.num_processes > 1 and kind.startswith("MULTI_")
    if not ddp:  # one process: accelerate places the model and wraps nothing
        return accelerator.prepare(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
    try:
        return accelerator.prepare(model)
    finally:
        del model._ddp_params_and_buffers_to_ignore  # DDP read it at construction; the model keeps no trace


def mean_over_ranks(accelerator: Any, losses: list[torch.Tensor], tokens: int) -> tuple[float, float]:
    """The logging window's mean step loss (each rank holds its share of every step's) and its token count, over every
    rank."""
    stats = torch.stack([torch.stack(losses).float().mean(), torch.tensor(float(tokens), device=losses[0].device)])
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(stats)
        stats[0] /= accelerator.num_processes
    loss, count = stats.tolist()
    return loss, count


def agree_across_ranks(accelerator: Any, nonfinite: torch.Tensor, received: Optional[int]) -> tuple[bool, Optional[int]]:
    """Once per optimiser step: did any rank see a NaN/inf loss, and did any get a stop signal (all ranks agree)."""
    if accelerator.num_processes == 1:
        return bool(nonfinite), received
    import torch.distributed as dist

    flags = torch.stack([nonfinite.float(), torch.full((), float(received or 0), device=nonfinite.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    diverged, signum = flags.tolist()
    return diverged > 0, int(signum) or None

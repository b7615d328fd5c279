"""A small training loop for base models (every weight trains): the demos' from-scratch and further-trained bases."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Optional, Sequence

import torch


def train_loop(
    parameters: Sequence[torch.nn.Parameter],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    data: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    log: Optional[Callable[[str], None]] = None,
    log_every: int = 250,
) -> float:
    """AdamW (betas 0.9/0.98) with 5% linear warm-up, cosine decay to 0, gradient clipping at 1.

    Args:
        parameters: what is trained.
        loss_fn: batch -> scalar loss.
        data: endless batches.
        steps, lr: optimisation length and peak learning rate.
        log: receives a progress line every ``log_every`` steps.
    Returns:
        seconds spent.
    """
    parameters = list(parameters)
    optimiser = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / steps)))
    )
    start, running = time.time(), None
    for step in range(1, steps + 1):
        loss = loss_fn(next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if log is not None and (step % log_every == 0 or step == steps):
            log(f"step {step}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)")
    return time.time() - start

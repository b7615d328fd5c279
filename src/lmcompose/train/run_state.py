"""What a training run carries: its state while it goes (:class:`RunState`) and what it reports (:class:`TrainingResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass
class TrainingResult:
    """What a finished run reports.

    Args:
        step: optimiser steps taken in total (resumed runs included).
        train_loss: mean train loss of the last logged window (None when no step ran here).
        eval_metrics: the last evaluation (empty without eval data).
        composition_dir: where the final composition was saved (None when the run was interrupted).
        resumed_from: the checkpoint the run continued from, if any.
        interrupted: the signal ("SIGTERM", "SIGINT") that stopped the run early, else None.
        checkpoint: the checkpoint written when the run was interrupted (resume from it).
    """

    step: int
    train_loss: Optional[float]
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    composition_dir: Optional[Path] = None
    resumed_from: Optional[Path] = None
    interrupted: Optional[str] = None
    checkpoint: Optional[Path] = None


@dataclass
class RunState:
    """Everything that changes while a run goes: where it is (what a checkpoint records) and the logging window."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # the current epoch
    position: int = 0  # micro-batches of the current epoch consumed
    window_losses: list = field(default_factory=list)  # this rank's share of each step's loss since the last record
    window_tokens: int = 0  # tokens (padding excluded) since the last train record
    window_kl: list = field(default_factory=list)  # this rank's share of each step's KL on preservation texts
    window_start: float = 0.0  # perf_counter() at the start of the window
    epoch_start: float = 0.0  # perf_counter() at the start of the epoch
    grad_norm: Optional[torch.Tensor] = None  # of the last optimiser step (before clipping)
    nonfinite: Optional[torch.Tensor] = None  # () bool: this optimiser step saw a NaN/inf loss so far
    stop: Optional[int] = None  # the signal every rank agreed to stop on
    saved_at: Optional[Path] = None  # the checkpoint written at the last optimiser step, if any
    last_loss: Optional[float] = None  # mean train loss of the last logged window
    last_eval: dict = field(default_factory=dict)  # the last evaluation record

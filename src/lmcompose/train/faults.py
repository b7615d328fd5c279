"""Faults while training: stop signals (SIGTERM, SIGINT), NaN/inf losses, and every rank agreeing on both."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any, Optional

from .checkpoints import latest_checkpoint
from .run_log import append_metrics

__all__ = ["StopSignals", "TrainingDivergedError", "stop_diverged"]

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; the weights of that step were not applied or saved.

    Args:
        step: the optimiser step whose loss was not finite (1-based, as in metrics.jsonl).
        last_checkpoint: the newest checkpoint, all written before that step, or None.
    """

    def __init__(self, message: str, step: int, last_checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class StopSignals:
    """While active, the first SIGTERM or SIGINT only asks the loop to stop after the current step (it then writes
    a checkpoint); the handlers that were there before are back from that moment, so a second signal acts at once.
    Only the main thread can install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()
        logger.warning("%s: stopping after this step and writing a checkpoint (send it again to stop now)",
                       signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def stop_diverged(step: int, epoch: int, checkpoints: Path, metrics_file: Optional[Path]) -> None:
    """Stop the run on a non-finite loss: nothing of this step is applied or saved; say where to resume."""
    last = latest_checkpoint(checkpoints)
    if metrics_file is not None:
        append_metrics(metrics_file, {"kind": "diverged", "step": step, "epoch": epoch})
    where = (
        f"the last good checkpoint is {last}: resume from it (--resume) with a lower learning rate, or check the data"
        if last is not None
        else "no checkpoint was written before it (save_every)"
    )
    raise TrainingDivergedError(
        f"Training stopped: the loss or gradient norm became NaN or infinite at step {step} (epoch {epoch}); "
        f"that step was not applied and nothing after step {step - 1} was saved; {where}",
        step,
        last,
    )

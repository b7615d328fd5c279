"""Resumable training checkpoints: ``checkpoints/step-N/`` written atomically, newest complete one found."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .checkpoint import atomic_write, atomic_write_text

STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy and torch (and CUDA) RNG states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every RNG back to a state from :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def step_of(path: Union[str, Path]) -> Optional[int]:
    """N for a directory named ``step-N``, else None."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """The complete ``step-N`` checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if step_of(p) is not None and (p / STATE_NAME).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint in ``directory``, or None."""
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def remove_incomplete(directory: Union[str, Path]) -> None:
    """Delete what an interrupted save left behind (temporary directories)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    directory: Union[str, Path],
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``directory/step-{step}/`` atomically, then delete all but the newest ``keep_last``.

    Everything goes into a temporary directory first (each file fsynced), which is then renamed:
    a reader sees a complete checkpoint or none.

    Args:
        directory: the run's ``checkpoints`` directory.
        step: the optimiser step just completed.
        model: the ComposedModel (its composition is saved with ``save_composition``).
        optimizer, scheduler: objects with ``state_dict()``.
        state: JSON-ready bookkeeping (step, epoch, data position, config, ...).
        keep_last: how many complete checkpoints to keep.
    Returns:
        the checkpoint directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    tmp = directory / f".step-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model.save_composition(tmp)
        atomic_write(tmp / OPTIMIZER_NAME, lambda t: torch.save(optimizer.state_dict(), t))
        atomic_write(tmp / SCHEDULER_NAME, lambda t: torch.save(scheduler.state_dict(), t))
        atomic_write(tmp / RNG_NAME, lambda t: torch.save(capture_rng_state(), t))
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2))
        if final.exists():
            old = directory / f".step-{step}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    for old in complete_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint_files(path: Union[str, Path]) -> dict[str, Any]:
    """Read a checkpoint's optimiser, scheduler and RNG states (``weights_only=True``) and its state JSON.

    Returns:
        ``{"optimizer", "scheduler", "rng", "state"}``.
    """
    path = Path(path)
    missing = [n for n in (STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return {
        "optimizer": torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True),
        "scheduler": torch.load(path / SCHEDULER_NAME, map_location="cpu", weights_only=True),
        "rng": torch.load(path / RNG_NAME, map_location="cpu", weights_only=True),
        "state": json.loads((path / STATE_NAME).read_text(encoding="utf-8")),
    }


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

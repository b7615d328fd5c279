"""Resumable training checkpoints: ``checkpoints/step-N/`` written atomically, newest complete one found."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..io.atomic import atomic_write, atomic_write_text, fsync_dir, remove_directory
from ..io.composition_files import read_metadata, read_weights
from ..io.safe_files import bytes_digest, file_digest, read_json
from ..model.composed import ComposedModel
from .config import TrainingConfig

STATE_NAME = "trainer_state.json"  # written last: its presence marks a complete checkpoint
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pt"
TENSOR_FILES = (OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME)  # their sha256 is in the state JSON, written after them
_STEP_DIR = re.compile(r"^step-(\d+)$")

logger = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
    """A checkpoint's files cannot be read (truncated, corrupted, or not weights-only); the message names the file."""


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
    """Delete what an interrupted save left behind (temporary and half-deleted directories)."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    directory: Union[str, Path],
    step: int,
    write_composition: Callable[[Path], None],
    optimizer_state: dict[str, Any],
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
        write_composition: writes the composition into a directory (``save_composition`` of the model).
        optimizer_state: the optimiser's state dict, full tensors.
        scheduler: an object with ``state_dict()``.
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
        write_composition(tmp)
        atomic_write(tmp / OPTIMIZER_NAME, lambda t: torch.save(optimizer_state, t), _tensor_bytes(optimizer_state))
        atomic_write(tmp / SCHEDULER_NAME, lambda t: torch.save(scheduler.state_dict(), t))
        atomic_write(tmp / RNG_NAME, lambda t: torch.save(capture_rng_state(), t))
        recorded = {**state, "sha256": {name: file_digest(tmp / name) for name in TENSOR_FILES}}
        recorded["state_sha256"] = _state_digest(recorded)
        atomic_write_text(tmp / STATE_NAME, json.dumps(recorded, indent=2))
        if final.exists():
            remove_directory(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory)
    for old in complete_checkpoints(directory)[:-keep_last]:
        remove_directory(old)
    return final


def _state_digest(state: dict[str, Any]) -> str:
    """The sha256 of a trainer state's content (without its own digest), independent of white space."""
    return bytes_digest(json.dumps({k: v for k, v in state.items() if k != "state_sha256"}, sort_keys=True).encode())


def _tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nest of dicts, lists and tuples (what a torch.save of it writes, about)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def load_checkpoint_files(path: Union[str, Path]) -> dict[str, Any]:
    """Read a checkpoint's optimiser, scheduler and RNG states (``weights_only=True``) and its state JSON.

    Returns:
        ``{"optimizer", "scheduler", "rng", "state"}``.
    """
    path = Path(path)
    missing = [n for n in (STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_NAME) if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        state = read_json(path / STATE_NAME, "trainer state")
    except ValueError as err:
        raise DamagedCheckpointError(str(err)) from None
    if isinstance(state, dict) and "state_sha256" in state and state["state_sha256"] != _state_digest(state):
        raise DamagedCheckpointError(f"{path / STATE_NAME} is not as it was written (its own digest differs): the "
                                     "file is damaged or was edited")
    check_state(state, path)
    digests = state.get("sha256") if isinstance(state.get("sha256"), dict) else {}
    for name in TENSOR_FILES:  # before anything is unpickled
        if name in digests and file_digest(path / name) != digests[name]:
            raise DamagedCheckpointError(f"{path / name} does not have the sha256 {STATE_NAME} records: the file is "
                                         "damaged or belongs to another checkpoint")
    files = {key: _load_tensors(path / name) for key, name in (("optimizer", OPTIMIZER_NAME),
                                                               ("scheduler", SCHEDULER_NAME), ("rng", RNG_NAME))}
    files["state"] = state
    return files


def check_state(state: Any, path: Path) -> None:
    """Refuse a trainer state with a field missing, of the wrong type or out of range (a hand edit, a damaged file):
    resuming from it would skip a wrong number of batches, or spin on one far past the data."""
    where = path / STATE_NAME
    if not isinstance(state, dict):
        raise DamagedCheckpointError(f"{where} is not a mapping: not a checkpoint lmcompose wrote")
    missing = [k for k in ("step", "epoch", "position", "num_examples", "data_sha256", "config") if k not in state]
    if missing:
        raise DamagedCheckpointError(f"{where} lacks {', '.join(missing)}: not a checkpoint lmcompose wrote")

    def integer(key: str, low: int) -> int:
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DamagedCheckpointError(f"{where}: {key} must be an integer >= {low}, got {value!r:.40}")
        return value

    step = integer("step", 1)
    integer("epoch", 0), integer("position", 0), integer("num_examples", 1)
    for key in ("total_steps", "num_processes"):
        if key in state:
            integer(key, 1)
    if step_of(path) is not None and step != step_of(path):
        raise DamagedCheckpointError(f"{where}: step {step} but the directory is {path.name}")
    if state.get("total_steps") is not None and step > state["total_steps"]:
        raise DamagedCheckpointError(f"{where}: step {step} is past the run's {state['total_steps']} steps")
    if not isinstance(state["data_sha256"], str) or not isinstance(state["config"], dict):
        raise DamagedCheckpointError(f"{where}: data_sha256 must be text and config a mapping")


def _load_tensors(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled objects."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DamagedCheckpointError(
            f"{file} is refused: it holds more than tensors and plain values, and only weights-only files are "
            f"loaded ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpointError(f"{file} cannot be read ({str(err).splitlines()[0]}); the file is damaged") from None


def verify_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read every file of a checkpoint (trainer states and the composition), without base models.

    Returns:
        what :func:`load_checkpoint_files` returns.
    Raises:
        DamagedCheckpointError: a file is missing, truncated, malformed or not weights-only.
    """
    path = Path(path)
    try:
        files = load_checkpoint_files(path)
        read_weights(path, read_metadata(path))
    except DamagedCheckpointError:
        raise
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DamagedCheckpointError(str(err)) from None
    return files


def restore_composition(
    model: Any, checkpoint: Path, config: TrainingConfig, data_sha: str, num_examples: int, num_processes: int = 1,
    total_steps: Optional[int] = None, batches_per_epoch: Optional[int] = None,
    fingerprints: Optional[tuple[dict[str, Any], list[dict[str, Any]]]] = None,
) -> dict[str, Any]:
    """Load the composition of ``checkpoint`` into ``model`` after checking it belongs to this run.

    ``fingerprints``: the bases' fingerprints when read elsewhere (see ``load_composition``).

    Returns:
        the checkpoint's other files, as :func:`load_checkpoint_files` reads them.
    Raises:
        ValueError: the checkpoint was written by another launch, config, data or set of connections.
        DamagedCheckpointError: its step or data position lies past ``total_steps`` / ``batches_per_epoch``.
    """
    files = verify_checkpoint(checkpoint)
    state = files["state"]
    if state.get("num_processes", 1) != num_processes:  # the data position counts each process's micro-batches
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was written by a run on {state.get('num_processes', 1)} "
            f"process(es), this one has {num_processes}; launch it with as many processes as before"
        )
    differences = config.trajectory_differences(TrainingConfig.from_dict(state["config"]))
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the training config differs from the checkpoint's "
            f"(checkpoint != now): {'; '.join(differences)}"
        )
    if state["num_examples"] != num_examples or state["data_sha256"] != data_sha:
        raise ValueError(
            f"Cannot resume from {checkpoint}: the training data differ from the data it was trained on "
            f"({state['num_examples']} examples then, {num_examples} now)"
        )
    if (total_steps is not None and state["step"] > total_steps) or (
            batches_per_epoch is not None and state["position"] >= batches_per_epoch):
        raise DamagedCheckpointError(
            f"{checkpoint}: step {state['step']} of {total_steps}, batch {state['position']} of an epoch of "
            f"{batches_per_epoch}: the checkpoint does not fit this run's data and length")
    saved = ComposedModel.from_composition(checkpoint, model.anchor, list(model.augments), fingerprints=fingerprints)
    differences = composition_differences(saved, model)
    if differences:
        raise ValueError(f"Cannot resume from {checkpoint}: its composition differs from the model's "
                         f"(checkpoint != now): {'; '.join(differences)}")
    model.connections.load_state_dict(saved.connections.state_dict())
    return files


def composition_differences(saved: Any, model: Any) -> list[str]:
    """How two compositions differ in what shapes their weights and their function: connected layers, heads (as
    resolved), norms, rotary, f_proj's bias, null attention. Empty when they are the same composition."""
    def described(m: Any) -> dict[str, Any]:
        config = m.composition_config
        return {"connections": m.resolved_connections, "num_heads": m.connections[0][0].num_heads,
                "norm": config.norm, "rotary": config.rotary, "proj_bias": config.proj_bias,
                "null_attention": config.null_attention, "null_score": config.null_score}

    before, now = described(saved), described(model)
    return [f"{key}: {before[key]!r} != {now[key]!r}" for key in before if before[key] != now[key]]


def newest_readable(checkpoints: Path) -> Optional[Path]:
    """The newest checkpoint whose files all read; damaged newer ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(checkpoints)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
            continue
        return path
    return None


def find_start(checkpoints: Path, resume: bool) -> Optional[Path]:
    """The checkpoint a run starts from: the newest readable one when resuming, else None (from step 0).

    Raises:
        FileExistsError: not resuming, but ``checkpoints`` holds an earlier run's checkpoints.
        DamagedCheckpointError: resuming, and no checkpoint there can be read.
    """
    if not resume:
        if complete_checkpoints(checkpoints):
            raise FileExistsError(
                f"{checkpoints} holds checkpoints of an earlier run: resume it (resume=True, --resume) "
                "or choose another output directory"
            )
        return None
    start = newest_readable(checkpoints)
    if start is None:
        if complete_checkpoints(checkpoints):
            raise DamagedCheckpointError(
                f"resume: no checkpoint in {checkpoints} can be read (see the warnings above); "
                "delete the damaged ones to start again"
            )
        logger.warning("resume: %s holds no complete checkpoint; starting from step 0", checkpoints)
    return start

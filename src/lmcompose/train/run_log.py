"""A run's record: metrics appended to ``metrics.jsonl`` and the loss plot ``loss.png``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Union

from ..io.atomic import DiskFullError, atomic_write, atomic_write_text, disk_full
from ..io.safe_files import parse_json

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 16  # a metrics record is a few hundred bytes


def append_metrics(path: Union[str, Path], record: dict[str, Any]) -> None:
    """Append one JSON record as a line of ``path`` (a full disk: :class:`~lmcompose.io.atomic.DiskFullError`; a
    torn line it may leave is skipped when read)."""
    line = json.dumps(record) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:
        if disk_full(err, Path(path).parent):
            raise DiskFullError(path, shutil.disk_usage(Path(path).parent).free, len(line)) from err
        raise


def read_metrics(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The records of a metrics file ([] when there is none).

    A line that is not a record lmcompose writes (a torn last line of a killed run, or one damaged or edited: not a
    JSON object, nested too deeply, without an integer ``step``) is skipped, with one warning for them all.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, skipped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = parse_json(raw.decode("utf-8"), str(path)) if len(raw) <= MAX_LINE_BYTES else None
            except (ValueError, UnicodeDecodeError):
                record = None
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
                records.append(record)
            else:
                skipped += raw.strip() != b""
    if skipped:
        logger.warning("%s: %d line(s) that are not metrics records were skipped", path, skipped)
    return records


def truncate_metrics(path: Union[str, Path], step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(records: list[dict[str, Any]], path: Union[str, Path]) -> None:
    """Draw train loss (line) and eval loss (markers) against the step into a PNG (Agg, no display).

    Args:
        records: metrics records; those with ``loss`` or ``eval_loss`` are drawn.
        path: the PNG to write (atomically).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    if train or evals:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))

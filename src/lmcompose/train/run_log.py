"""A run's record: metrics appended to ``metrics.jsonl`` and the loss plot ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from ..io.atomic import atomic_write, atomic_write_text


def append_metrics(path: Union[str, Path], record: dict[str, Any]) -> None:
    """Append one JSON record as a line of ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The records of a metrics file ([] when there is none); a torn last line (killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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

"""Padding: the one implementation every batch of the package is padded with, and the id put on padding."""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def pad_token_id(tokenizer: Any = None, model: Any = None) -> int:
    """The id used for padding: the tokenizer's pad (else EOS) token, else the anchor config's, else 0."""
    for source in (tokenizer, getattr(getattr(model, "anchor", model), "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def row_slice(length: int, width: int, side: str) -> slice:
    """Where a row of ``length`` entries sits in a padded row of ``width``: at the end ("left" padding) or the start."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    return slice(width - length, width) if side == "left" else slice(0, length)


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids of different lengths as one padded batch.

    Args:
        rows: one sequence of integers (or 1-d tensor) per row.
        value: what fills the padding (a pad id, or -100 for labels).
        side: "right" (training, scoring) or "left" (generation).
    Returns:
        (padded, mask): (b, t) long each; mask is 1 on each row's own entries, 0 on padding.
    """
    width = max((len(r) for r in rows), default=0)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = row_slice(len(row), width, side)
        padded[i, where] = torch.as_tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return padded, mask

"""The objective of one optimiser step: its micro-batches, and each one's share of the step's loss.

Each micro-batch's loss is summed over its target tokens and divided by the target tokens of the whole step (every
micro-batch, every rank); the KL from the anchor on preservation texts likewise by their positions. So how a step
is split into micro-batches and processes does not change it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..core.padding import IGNORE_INDEX
from ..model.hooks import head_at
from .evaluation import token_loss_sum
from .preservation import preservation_kl_sum


def grouped_by_step(batches: Iterable[dict[str, Any]], accumulation: int) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of each optimiser step, ``accumulation`` at a time (the last group may have fewer)."""
    group: list[dict[str, Any]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def step_totals(accelerator: Any, batches: list[dict[str, Any]]) -> torch.Tensor:
    """What one optimiser step scores, summed over its micro-batches and every rank: (target tokens, preservation
    positions), a float64 (2,) tensor the step's losses are divided by.

    Dividing each micro-batch's summed loss by these (not by its own count) gives every target token of the step
    the same weight, however the step is split into micro-batches and processes (transformers' Trainer does the
    same with ``num_items_in_batch``).
    """
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    preserved = sum(int(b["attention_mask"][b["preserve_rows"]].sum()) for b in batches if "preserve_rows" in b)
    totals = torch.tensor([float(targets), float(preserved)], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return totals


def scored_positions(labels: torch.Tensor, attention_mask: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: the positions whose logits a micro-batch's loss reads: those that predict a target token, and
    every position of the preservation rows ``rows`` (B,) (their KL counts each one).

    Args:
        labels: (B, T), -100 where there is no target (shifted as in transformers: position t predicts t + 1).
        attention_mask: (B, T), 1 for tokens.
        rows: (B,) bool or None.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if rows is not None:
        keep[rows] |= attention_mask[rows].bool()
    return keep


@contextmanager
def scored_logits_only(model: Any, labels: torch.Tensor, attention_mask: torch.Tensor,
                       rows: Optional[torch.Tensor]) -> Iterator[None]:
    """While active, the anchor's LM head computes the logits at :func:`scored_positions` only (zeros elsewhere,
    where the loss does not look): the same loss and gradients without the vocabulary-wide matmul at every other
    position. A model without output embeddings runs as it is."""
    head = model.anchor.get_output_embeddings() if hasattr(model, "anchor") else None
    if head is None:
        yield
        return
    with head_at(head, scored_positions(labels, attention_mask, rows)):
        yield


def micro_batch_loss(forward: Callable[..., Any], model: Any, batch: dict[str, Any], totals: torch.Tensor,
                     preserve_weight: float, processes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's share of its step's loss, and its share of the step's preservation KL (detached).

    The share: its summed LM loss over the step's target tokens, plus ``preserve_weight`` times its summed KL from
    the anchor's own next-token distribution over the step's preservation positions; both times ``processes``,
    since DDP and FSDP2 average the ranks' gradients.

    Args:
        forward: the (wrapped) composed model's forward.
        model: the ComposedModel itself (the anchor's logits for the KL come from it).
        batch: the collated micro-batch (``labels``, maybe ``preserve_rows``).
        totals: (2,) the step's target tokens and preservation positions (:func:`step_totals`).
    """
    batch = dict(batch)
    rows, labels = batch.pop("preserve_rows", None), batch.pop("labels")
    with scored_logits_only(model, labels, batch["attention_mask"], rows):
        out = forward(**batch)  # no labels: the loss is summed here, not averaged over this micro-batch
    targets, positions = totals.clamp(min=1).tolist()
    loss = token_loss_sum(out.logits, labels)[0] * (processes / targets)
    kl = torch.zeros((), device=loss.device)
    if rows is not None and rows.any():
        kl = preservation_kl_sum(model, batch, out.logits, rows)[0] * (processes / positions)
        loss = loss + preserve_weight * kl
    return loss, kl.detach()

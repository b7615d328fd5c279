"""Keeping the anchor: the KL divergence from the anchor's own next-token distribution on preservation texts.

Ordinary text mixed into the composition data (``preserve_dataset`` of :func:`~lmcompose.train.recipe.train`,
``--preserve-data``) is scored not by its own tokens but by how far the composed model's next-token distributions
are from the anchor's: self-distillation, which teaches the connections to add nothing where the augment has
nothing to add (beyond the paper, whose D_C is the only data).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from .config import TrainingConfig
from .evaluation import token_kl_sum


def check_preservation(config: TrainingConfig, preserve_dataset: Optional[Dataset]) -> None:
    """Refuse a preservation weight without texts, and texts with the augment-state cache (it holds no states for
    them)."""
    if config.preserve_weight > 0 and preserve_dataset is None:
        raise ValueError("preserve_weight (--preserve-weight) needs preservation texts: pass preserve_dataset= "
                         "(--preserve-data FILE.jsonl), ordinary text on which the anchor is to be kept")
    if preserve_dataset is not None and config.preserve_weight > 0 and config.cache_augment_states:
        raise ValueError("cache_augment_states (--cache-augment-states) does not work with preservation texts "
                         "(--preserve-data): their augment states are not cached. Turn one of them off")


def preservation_kl_sum(model: Any, batch: dict[str, Any], logits: torch.Tensor, rows: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(anchor || composed) over the positions of a batch's preservation rows, and their number.

    The recipe divides the sum by the positions of the whole optimiser step (every micro-batch, every rank), so how
    a step is split into micro-batches and processes does not change it.

    Args:
        model: the ComposedModel (unwrapped): the anchor's logits come from it under ``disable_composition()``.
        batch: the collated batch (``input_ids``, ``attention_mask`` (B, T), maybe ``anchor_prefix``).
        logits: (B, T, V) of the composed forward over the batch.
        rows: (B,) bool, True on the preservation rows.
    Returns:
        (KL sum with a gradient through ``logits``, positions), both 0-dim tensors.
    """
    inputs = {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows]}
    prefix = batch.get("anchor_prefix")
    if prefix is not None:  # the anchor's lower blocks, replayed for the reference too
        inputs["anchor_prefix"] = dataclasses.replace(prefix, states=prefix.states[rows])
    with torch.no_grad(), model.disable_composition():
        anchor_logits = model(**inputs, use_cache=False).logits  # (P, T, V): the anchor alone, the reference
    return token_kl_sum(anchor_logits, logits[rows], inputs["attention_mask"])


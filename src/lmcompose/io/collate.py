"""Batches for a composed model: padded ids, labels and masks, aligned ids for augments with their own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.alignment import align_batch
from ..core.padding import IGNORE_INDEX, pad_rows, pad_token_id, row_slice


@dataclass(frozen=True)
class Collator:
    """Pads a list of examples into a batch (dynamic padding: to the longest example).

    Each example is ``{"input_ids", "labels"?, "augment_states"?}``; ``augment_states`` (per augment,
    ``{layer: (T_i, D_A)}``) is padded with zeros like the ids. Augments with their own tokenizer get
    their ids from the anchor's: the text is decoded and aligned (:func:`lmcompose.core.alignment.align_batch`).

    Args:
        pad_token_id: id placed on padding.
        padding_side: "right" or "left".
        tokenizer: the anchor's tokenizer; needed only with ``augment_tokenizers``.
        augment_tokenizers: per augment, its tokenizer, or None where it reads the anchor's ids
            (``ComposedModel.augment_tokenizers``).
    Returns (from a call):
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (0 on padding), ``labels`` (B, T)
        long (-100 on padding), ``augment_states`` (per augment, ``{layer: (B, T, D_A)}``) when given,
        ``preserve_rows`` (B,) bool when examples carry preservation texts (``"preserve"``: those rows come after
        the examples, with no labels),
        and, when an augment has its own tokenizer, ``augment_input_ids``, ``augment_attention_mask``
        (per augment (B, S) or None) and ``augment_limits`` (per augment (B, T) or None).
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    tokenizer: Any = None
    augment_tokenizers: tuple = ()

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if any(t is not None for t in self.augment_tokenizers) and self.tokenizer is None:
            raise ValueError("Collator: augment_tokenizers need the anchor's tokenizer as well (tokenizer=)")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        preserve = [list(p) for e in examples for p in e.get("preserve", ())]  # rows after the examples, no labels
        ids = [list(e["input_ids"]) for e in examples] + preserve
        labels = [list(e.get("labels", e["input_ids"])) for e in examples] + [[IGNORE_INDEX] * len(p) for p in preserve]
        batch_ids, mask = pad_rows(ids, self.pad_token_id, self.padding_side)  # (B, T) each
        batch_labels, _ = pad_rows(labels, IGNORE_INDEX, self.padding_side)
        batch: dict[str, Any] = {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}
        if any("preserve" in e for e in examples):
            batch["preserve_rows"] = torch.arange(len(ids)) >= len(examples)  # (B,) bool
        if "augment_states" in examples[0]:
            batch["augment_states"] = self._pad_states([e["augment_states"] for e in examples], batch_ids.shape[1])
        if any(tok is not None for tok in self.augment_tokenizers):
            aligned = align_batch(ids, self.tokenizer, self.augment_tokenizers, self.padding_side)
            for key in ("augment_input_ids", "augment_attention_mask", "augment_limits"):
                batch[key] = aligned[key]  # same padding of the anchor ids, so limits index this batch
        return batch

    def _pad_states(self, states: list[list[dict[int, torch.Tensor]]], t: int) -> list[dict[int, torch.Tensor]]:
        """Per example, per augment {layer: (T_i, D_A)} -> per augment {layer: (B, T, D_A)}."""
        padded = []
        for a, layers in enumerate(states[0]):
            out = {}
            for layer, first in layers.items():
                full = first.new_zeros((len(states), t, first.shape[-1]))  # (B, T, D_A)
                for row, example in enumerate(states):
                    x = example[a][layer]  # (T_i, D_A)
                    full[row, row_slice(x.shape[0], t, self.padding_side)] = x
                out[layer] = full
            padded.append(out)
        return padded


def collator_for(model: Any, tokenizer: Any = None, padding_side: str = "right") -> Collator:
    """The collator a ComposedModel's batches need: its pad id, and alignment for augments with their own tokenizer.

    Args:
        model: a ComposedModel (or one causal LM).
        tokenizer: the anchor's tokenizer, for the pad id (else the anchor config's).
        padding_side: "right" or "left".
    """
    own = tuple(getattr(model, "augment_tokenizers", None) or ())
    if not any(t is not None for t in own):
        return Collator(pad_token_id(tokenizer, model), padding_side)
    return Collator(pad_token_id(tokenizer, model), padding_side, model.tokenizer, own)

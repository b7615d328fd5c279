"""The anchor-state cache of a training run (``cache_anchor_states``): each text's anchor states below the lowest
connection, computed once and replayed at every later step.

A composition step otherwise runs the frozen anchor's lower blocks on every example of every epoch (and again for
the anchor's reference distribution on preservation texts), though no connection changes them. The texts' states
are computed before the first step, without padding, texts of one length together in a fixed order (:meth:`fill`),
so they never depend on the batch a text comes in with: a resumed run replays what an uninterrupted one does. A text
not filled (one the collator changed) is computed alone when it first comes. They stay in memory (or on the
accelerator): the texts' tokens times the anchor's width, in its dtype.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Optional, Sequence

import torch

from ..core import introspect
from ..model.anchor_prefix import AnchorPrefix, check_prefix_anchor, compute_prefix


class AnchorStateCache:
    """Per text (its token ids), the anchor's output of block ``model.anchor_prefix_layer``, ``(n, D)``."""

    def __init__(self, model: Any) -> None:
        check_prefix_anchor(model.anchor, model.anchor_prefix_layer)
        self.layer = model.anchor_prefix_layer
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.arity: Optional[int] = None  # how the anchor's blocks return their states (AnchorPrefix.arity)

    def fill(self, anchor: Any, texts: Iterable[Sequence[int]], batch_size: int = 32) -> None:
        """Compute the states of ``texts`` (anchor ids, unpadded) not held yet: equal lengths together, in the order
        of (length, ids), ``batch_size`` at a time."""
        device = introspect.execution_device(anchor.get_input_embeddings(), "the anchor's input embeddings")
        todo = sorted({tuple(int(i) for i in text) for text in texts if len(text)} - self.states.keys(),
                      key=lambda text: (len(text), text))
        for _, same_length in itertools.groupby(todo, key=len):
            group = list(same_length)
            for start in range(0, len(group), batch_size):
                ids = torch.tensor(group[start : start + batch_size], device=device)  # (k, n): no padding
                computed = compute_prefix(anchor, self.layer, ids, torch.ones_like(ids))
                self.arity = computed.arity
                for text, states in zip(group[start : start + batch_size], computed.states):
                    self.states[text] = states

    def prefix(self, anchor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> AnchorPrefix:
        """The batch's prefix for ``ComposedModel.forward(anchor_prefix=...)``; a text not held is computed alone.

        Args:
            anchor: the composition's (frozen) anchor.
            input_ids: (b, t) anchor ids, padded on either side.
            attention_mask: (b, t) 1 for tokens, 0 for padding.
        Returns:
            states (b, t, D), zeros at padding.
        """
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            keep = mask.bool()
            text = tuple(ids[keep].tolist())
            if text not in self.states:
                self.fill(anchor, [text])
            rows.append((keep, self.states[text]))
        first = rows[0][1]
        states = first.new_zeros((*input_ids.shape, first.shape[-1]))  # (b, t, D)
        for b, (keep, text_states) in enumerate(rows):
            states[b, keep] = text_states
        return AnchorPrefix(states, self.layer, self.arity)

    @property
    def tokens(self) -> int:
        """Tokens whose states the cache holds."""
        return sum(s.shape[0] for s in self.states.values())

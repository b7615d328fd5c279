"""Decoding state of an augment with its own tokenizer: each sequence's text is re-tokenized as it grows, and the
augment runs once per step for the whole batch on the tokens that changed.

Every row's augment tokens live in slots of one batched KV cache and one composition cache. A step appends the
same number of slots to every row (its new tokens, then empty slots); a token the re-tokenization replaced keeps its
slot, marked empty. ``key_token`` says which token each slot holds (-1: empty), so attention inside the augment and
the anchor's cross-attention read exactly each row's current tokens, as a full forward over its text would.

Legend: b batch, m new slots per row in a step, S slots in all.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from ..core import introspect
from ..core.alignment import anchor_token_ends, anchor_trailing_specials, augment_encoding, settled_limits
from .decoding_cache import CompositionCache


class RowText:
    """One sequence's alignment: its anchor tokens' character ends, the augment's ids, what each anchor token may
    read of them (limits) and the slot of each augment token."""

    def __init__(self, pads: int) -> None:
        self.pads = pads  # left padding of this row in the anchor's batch
        self.anchor_ends: list[int] = []
        self.augment_ids: list[int] = []
        self.limits: list[int] = []
        self.slots: list[int] = []

    def retokenize(self, model: Any, a: int, anchor_ids: list[int]) -> tuple[list[int], list[int], list[int], int]:
        """The row's text after ``anchor_ids`` (no padding) re-tokenized by augment ``a``.

        Returns:
            (ends, augment ids, limits, keep): keep = how many leading augment ids are unchanged.
        """
        tokenizer, augment_tokenizer = model.tokenizer, model.augment_tokenizers[a]
        known = self.anchor_ends[: len(anchor_ids) - 1]  # earlier ends stay, except trailing special tokens'
        trailing = anchor_trailing_specials(tokenizer, anchor_ids[: len(known)])
        known = known[: next((k for k, t in enumerate(trailing) if t), len(known))]
        text, ends = anchor_token_ends(tokenizer, anchor_ids, known=known)
        encoding = augment_encoding(augment_tokenizer, text)
        new_ids = encoding[0]
        if not new_ids:
            raise ValueError("The augment's tokenizer gives no token for this text; give a longer prompt")
        keep = 0
        while keep < min(len(self.augment_ids), len(new_ids)) and self.augment_ids[keep] == new_ids[keep]:
            keep += 1
        limits = settled_limits(augment_tokenizer, text, ends, new_ids, anchor_trailing_specials(tokenizer, anchor_ids),
                                known=self.limits[: len(anchor_ids)], unchanged=keep, encoding=encoding)
        return ends, new_ids, limits, keep

    def first_changed(self, limits: Sequence[int], keep: int) -> int:
        """The first anchor token whose limit differs from before (or read a token that changed)."""
        return next((k for k, old in enumerate(self.limits[: len(limits)]) if old != limits[k] or old > keep),
                    min(len(self.limits), len(limits)))


class RetokenizedAugment:
    """The batched state of one augment with its own tokenizer (kept in the batch order of the anchor's cache)."""

    def __init__(self, a: int) -> None:
        self.a = a
        self.rows: list[RowText] = []
        self.cache: Any = None  # the augment's KV cache, (b, ..., S, ...)
        self.composition = CompositionCache(1, 64)
        self.key_token = torch.zeros(0, 0, dtype=torch.long)  # (b, S): the token in each slot, -1 when empty

    def advance(self, model: Any, anchor_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """Bring every row up to ``anchor_ids`` (b, T) (left padding where ``attention_mask`` is 0): re-tokenize,
        empty the slots of replaced tokens, run the augment once on every row's new tokens.

        Returns:
            the first anchor position (batch index, padding counted) that must run again.
        """
        device = anchor_ids.device
        if not self.rows:
            for mask in attention_mask.tolist():
                pads = len(mask) - sum(mask)
                if not all(mask[pads:]):
                    raise ValueError("An augment with its own tokenizer needs left-padded prompts (no gaps in the "
                                     "attention mask)")
                self.rows.append(RowText(pads))
            self.cache = introspect.new_cache(model.augments[self.a])
            self.composition = CompositionCache(1, 64)
            self.key_token = torch.zeros(len(self.rows), 0, dtype=torch.long, device=device)
        earliest, tails = anchor_ids.shape[1], []
        for r, (row, ids) in enumerate(zip(self.rows, anchor_ids.tolist())):
            ends, new_ids, limits, keep = row.retokenize(model, self.a, ids[row.pads:])
            earliest = min(earliest, row.pads + row.first_changed(limits, keep))
            for slot in row.slots[keep:]:
                self.key_token[r, slot] = -1
            row.anchor_ends, row.augment_ids, row.limits, row.slots = ends, new_ids, limits, row.slots[:keep]
            tails.append(new_ids[keep:])
        width = max(len(t) for t in tails)
        if width:
            self._run(model, tails, width, device)
        return earliest

    def _run(self, model: Any, tails: list[list[int]], width: int, device: torch.device) -> None:
        """Append ``width`` slots to every row: its new tokens ``tails[r]``, then empty slots; run the augment."""
        b, start = len(self.rows), self.key_token.shape[1]
        ids = torch.zeros(b, width, dtype=torch.long)
        tokens = torch.full((b, width), -1, dtype=torch.long)  # the token index in each new slot
        for r, (row, tail) in enumerate(zip(self.rows, tails)):
            ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            first = len(row.slots)
            tokens[r, : len(tail)] = torch.arange(first, first + len(tail))
            row.slots += list(range(start, start + len(tail)))
        ids, tokens = ids.to(device), tokens.to(device)
        # the augment reads each row's current tokens; a new empty slot comes after them (it cannot be read in this
        # step) and reads itself, so nothing it stores is undefined; later steps never read it
        valid = torch.cat([(self.key_token >= 0).long(), torch.ones_like(tokens)], dim=1)  # (b, S)
        self.key_token = torch.cat([self.key_token, tokens], dim=1)
        positions = tokens.clamp(min=0)  # (b, m): each token at its own index in its row
        states = model.augment_hidden(self.a, ids, valid, positions, cache=self.cache)
        self.composition.append(model.project(self.a, states, positions), tokens >= 0)

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per connection (keys, values), each (b, h, S, d), slot by slot."""
        return self.composition.key_values()

    def limits(self, start: int, total: int, device: torch.device) -> torch.Tensor:
        """(b, total - start): how many augment tokens each anchor position from ``start`` may read (0 on padding)."""
        out = torch.zeros(len(self.rows), total - start, dtype=torch.long)
        for r, row in enumerate(self.rows):
            first = max(start, row.pads)
            out[r, first - start :] = torch.tensor(row.limits[first - row.pads : total - row.pads], dtype=torch.long)
        return out.to(device)

    def in_step(self, anchor_length: int) -> bool:
        """Whether every row has seen the anchor's ``anchor_length`` positions."""
        if not self.rows:
            return anchor_length == 0
        return all(row.pads + len(row.limits) == anchor_length for row in self.rows)

    def crop(self, anchor_length: int) -> None:
        """Forget anchor positions from ``anchor_length`` on; the augment side is reconciled by the next advance."""
        for row in self.rows:
            kept = max(0, anchor_length - row.pads)
            row.anchor_ends, row.limits = row.anchor_ends[:kept], row.limits[:kept]

    def select(self, indices: Sequence[int]) -> None:
        """Keep (and reorder) the rows ``indices`` (beam reordering, several sequences per prompt)."""
        if not self.rows:
            return
        self.rows = [copy.deepcopy(self.rows[i]) for i in indices]
        index = torch.tensor(list(indices), dtype=torch.long, device=self.key_token.device)
        self.key_token = self.key_token.index_select(0, index)
        self.cache.batch_select_indices(index)
        self.composition.select(index)

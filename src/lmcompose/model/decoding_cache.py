"""The decoding state of a composition: each connection's projected augment keys and values (CompositionCache) and
the one cache object transformers' ``generate`` carries between steps (ComposedCache)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers.cache_utils import Cache

from ..core import introspect


class CompositionCache:
    """Projected keys and values of one augment's connections, in buffers that grow by doubling.

    Args:
        batch: b.
        capacity: positions to allocate at first (prompt + new tokens is a good guess).
    """

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch = batch
        self.capacity = max(1, capacity)
        self.length = 0
        self._keys: list[torch.Tensor] = []  # per connection: (b, h, capacity, d)
        self._values: list[torch.Tensor] = []
        self.key_valid: Optional[torch.Tensor] = None  # (b, capacity) bool, False on augment padding

    def _grow(self, needed: int) -> None:
        while self.capacity < needed:
            self.capacity *= 2
        for store in (self._keys, self._values):
            for c, old in enumerate(store):
                new = old.new_empty(*old.shape[:2], self.capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[c] = new
        valid = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=self.key_valid.device)
        valid[:, : self.length] = self.key_valid[:, : self.length]
        self.key_valid = valid

    def append(self, key_values: Sequence[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor) -> None:
        """Add s positions: per connection (keys, values), each (b, h, s, d); valid (b, s)."""
        s = valid.shape[1]
        if not self._keys:
            self.batch = valid.shape[0]
            self._keys = [k.new_empty(*k.shape[:2], self.capacity, k.shape[3]) for k, _ in key_values]
            self._values = [v.new_empty(*v.shape[:2], self.capacity, v.shape[3]) for _, v in key_values]
            self.key_valid = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=valid.device)
        end = self.length + s
        if end > self.capacity:
            self._grow(end)
        for c, (k, v) in enumerate(key_values):
            self._keys[c][:, :, self.length : end] = k
            self._values[c][:, :, self.length : end] = v
        self.key_valid[:, self.length : end] = valid.bool()
        self.length = end

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        self.length = max(0, min(self.length, length))

    def select(self, indices: torch.Tensor) -> None:
        """Keep (and reorder) the batch rows ``indices`` (b',): beam reordering, dropping finished rows."""
        if not self._keys:
            return
        self._keys = [k.index_select(0, indices.to(k.device)) for k in self._keys]
        self._values = [v.index_select(0, indices.to(v.device)) for v in self._values]
        self.key_valid = self.key_valid.index_select(0, indices.to(self.key_valid.device))
        self.batch = int(indices.shape[0])

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (several sequences per prompt)."""
        if self._keys:
            self.select(torch.arange(self.batch).repeat_interleave(repeats))

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of what is filled: per connection (keys, values), each (b, h, length, d)."""
        n = self.length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self._keys, self._values)]


class ComposedCache(Cache):
    """Everything a composition keeps between decoding steps, as one transformers ``Cache``: the anchor's KV cache
    and, per augment, its KV cache and :class:`CompositionCache` (or, for an augment with its own tokenizer, a
    :class:`~lmcompose.model.retokenized.RetokenizedAugment` holding both, in slots, with each sequence's alignment).

    ``generate`` creates one per call and passes it to every forward as ``cache`` (``past_key_values``); a forward
    given one advances all of its parts by the new tokens. Its length is the anchor's; cropping, beam reordering and
    batch selection apply to every part, so every decoding strategy of ``generate`` keeps the parts in step.

    Args:
        anchor: the anchor's KV cache.
        augments: per augment, its KV cache (None for an augment with its own tokenizer).
        compositions: per augment, the projected keys and values of its connections (None likewise).
        retokenized: per augment, its per-sequence state when it has its own tokenizer, else None.
    """

    def __init__(self, anchor: Any, augments: Sequence[Any], compositions: Sequence[Optional[CompositionCache]],
                 retokenized: Optional[Sequence[Any]] = None) -> None:
        super().__init__(layers=[])  # the parts hold the layers
        self.anchor = anchor
        self.augments = list(augments)
        self.compositions = list(compositions)
        self.retokenized = list(retokenized) if retokenized is not None else [None] * len(self.augments)
        self.token_ids: Optional[torch.Tensor] = None  # (b, T): the anchor's tokens so far (re-tokenized augments)

    def record(self, new_ids: torch.Tensor) -> None:
        """Append the anchor's new tokens (b, n)."""
        self.token_ids = new_ids if self.token_ids is None else torch.cat([self.token_ids, new_ids], dim=1)

    @classmethod
    def for_model(cls, model: Any, capacity: int = 64) -> "ComposedCache":
        """An empty cache for the composed ``model``, its composition buffers sized for ``capacity`` positions."""
        from .retokenized import RetokenizedAugment

        shared = [model.shares_tokenizer(a) for a in range(len(model.augments))]
        return cls(introspect.new_cache(model.anchor),
                   [introspect.new_cache(m) if s else None for m, s in zip(model.augments, shared)],
                   [CompositionCache(1, capacity) if s else None for s in shared],
                   [None if s else RetokenizedAugment(a) for a, s in enumerate(shared)])

    def _parts(self) -> list[Any]:
        return [self.anchor, *(a for a in self.augments if a is not None)]

    def _compositions(self) -> list[CompositionCache]:
        return [c for c in self.compositions if c is not None]

    def _retokenized(self) -> list[Any]:
        return [r for r in self.retokenized if r is not None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions the anchor has seen."""
        return self.anchor.get_seq_length()

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: the cache grows without bound."""
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """The anchor's mask sizes (its attention reads the anchor cache)."""
        return self.anchor.get_mask_sizes(query_length, layer_idx)

    def in_step(self) -> bool:
        """Whether every augment has seen as many positions as the anchor (it does unless composition was disabled
        while this cache was filled)."""
        length = self.get_seq_length()
        return all(c is None or c.length == length for c in self.compositions) and all(
            a is None or a.get_seq_length() == length for a in self.augments) and all(
            r is None or r.in_step(length) for r in self.retokenized)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (a positive value: keep that many, as older transformers
        versions call it)."""
        current = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else current + tokens_to_remove
        for part in self._parts():
            introspect.crop_cache(part, keep)
        for composition in self._compositions():
            composition.crop(keep)
        for retokenized in self._retokenized():
            retokenized.crop(keep)
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :keep]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: row i becomes the old row ``beam_idx[i]``."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (and reorder) the batch rows ``indices``."""
        for part in self._parts():
            if part.get_seq_length() > 0:
                part.batch_select_indices(indices)
        for composition in self._compositions():
            composition.select(indices)
        for retokenized in self._retokenized():
            retokenized.select(indices.tolist())
        if self.token_ids is not None:
            self.token_ids = self.token_ids.index_select(0, indices.to(self.token_ids.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        for part in self._parts():
            part.batch_repeat_interleave(repeats)
        for composition in self._compositions():
            composition.repeat_interleave(repeats)
        for retokenized in self._retokenized():
            retokenized.select([i for i in range(len(retokenized.rows)) for _ in range(repeats)])
        if self.token_ids is not None:
            self.token_ids = self.token_ids.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        """Empty every part."""
        for part in self._parts():
            part.reset()
        for composition in self._compositions():
            composition.crop(0)
        for retokenized in self._retokenized():
            retokenized.rows = []
        self.token_ids = None

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Let every part roll back (assisted decoding); ``kwargs`` are generate's own (``recurrent_states_to_keep``
        in transformers >= 5.25) and go to each part."""
        for part in self._parts():
            part.activate_past_recording(**kwargs)

    def get_recurrent_states_to_keep(self, layer_idx: Optional[int] = None) -> int:
        """The recurrent states the anchor's layer ``layer_idx`` keeps while recording, or the most any part keeps
        (0 for attention layers, which have none)."""
        parts = [self.anchor] if layer_idx is not None else self._parts()
        return max(part.get_recurrent_states_to_keep(layer_idx) if hasattr(part, "get_recurrent_states_to_keep")
                   else 0 for part in parts)

    @property
    def batch_size(self) -> int:
        """The anchor cache's batch size (-1 before the first forward)."""
        return self.anchor.batch_size if self.get_seq_length() > 0 else -1

    @property
    def is_compileable(self) -> bool:
        """False: the composition buffers grow."""
        return False

    @property
    def is_initialized(self) -> bool:
        """Whether the anchor cache has been filled."""
        return self.get_seq_length() > 0

    @property
    def is_croppable(self) -> bool:
        """Whether every part can be cropped back exactly."""
        return all(part.is_croppable for part in self._parts())

    @property
    def is_sliding(self) -> list[bool]:
        """The anchor's layers."""
        return self.anchor.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        """The anchor's layers."""
        return self.anchor.is_linear

    @property
    def is_dummy(self) -> list[bool]:
        """The anchor's layers."""
        return self.anchor.is_dummy

    def __len__(self) -> int:
        return len(self.anchor)

    def __repr__(self) -> str:
        return f"ComposedCache(length={self.get_seq_length()}, augments={len(self.augments)})"


def as_composed_cache(cache: Any, past_key_values: Any) -> Optional[ComposedCache]:
    """The one cache argument of a forward, which must be a :class:`ComposedCache` (or None)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: cache= and past_key_values= are the same argument")
    given = cache if cache is not None else past_key_values
    if given is not None and not isinstance(given, ComposedCache):
        raise ValueError(f"A composed model needs its own cache, not a {type(given).__name__}: pass the .cache of an "
                         "earlier call of this model (a ComposedCache), or None")
    return given

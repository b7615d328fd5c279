"""The composition cache of decoding: each connection's projected augment keys and values, grown as tokens come."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


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
        """Forget every position from ``length`` on (the augment re-tokenized its tail)."""
        self.length = min(self.length, length)

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of what is filled: per connection (keys, values), each (b, h, length, d)."""
        n = self.length
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self._keys, self._values)]

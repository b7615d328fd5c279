"""The order of training examples: one seeded permutation per epoch, rebuilt exactly after a restart."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of the examples each epoch that depends only on (seed, epoch).

    The order of any epoch can be rebuilt after a restart, which makes resumed runs exact.
    ``set_epoch`` follows the torch/accelerate convention (as DistributedSampler).

    Args:
        size: number of examples.
        seed: the run's seed.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size

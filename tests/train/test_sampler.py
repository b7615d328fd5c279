"""train/sampler.py: one permutation per epoch that depends only on (seed, epoch)."""

from lmcompose.train.sampler import EpochShuffleSampler


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)
    assert sorted(first) == list(range(50)) and first != second and list(b) == second

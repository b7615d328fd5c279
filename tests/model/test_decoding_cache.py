"""model/decoding_cache.py: the composition cache keeps what was appended, in order, across growth and crops."""

import torch

from lmcompose.model.decoding_cache import CompositionCache


def kv(b, s, value):
    return [(torch.full((b, 2, s, 3), float(value)), torch.full((b, 2, s, 3), -float(value)))]


def test_appended_positions_read_back_in_order_through_growth_and_crop():
    cache = CompositionCache(batch=2, capacity=2)
    cache.append(kv(2, 2, 1), torch.tensor([[0, 1], [1, 1]]))
    cache.append(kv(2, 3, 2), torch.ones(2, 3))  # beyond the capacity: the buffers grow
    (keys, values), = cache.key_values()
    assert cache.length == 5 and cache.capacity >= 5
    assert keys[:, :, :, 0].tolist() == [[[1, 1, 2, 2, 2]] * 2] * 2 and torch.equal(values, -keys)
    assert cache.key_valid[:, :5].tolist() == [[False, True, True, True, True], [True] * 5]
    cache.crop(3)
    cache.append(kv(2, 1, 7), torch.ones(2, 1))
    (keys, _), = cache.key_values()
    assert keys.shape[2] == 4 and keys[0, 0, :, 0].tolist() == [1, 1, 2, 7]

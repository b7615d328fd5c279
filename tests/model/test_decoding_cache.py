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


def test_the_composed_cache_repeats_selects_and_crops_every_part_in_step():
    from lmcompose import ComposedModel
    from lmcompose.testing import tiny_causal_lm

    from helpers import randomize_composition

    anchor = tiny_causal_lm("llama", hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("gpt2", hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment)
    randomize_composition(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    cache = model(ids, use_cache=True).cache
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1, 0
    cache.crop(-1)  # forget the last position of both
    new = torch.tensor([[20, 21], [22, 23]])
    got = model(new, cache=cache).logits
    expected = model(torch.cat([ids[[1, 0], :3], new], dim=1), use_cache=False).logits[:, -2:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 5 and cache.in_step()

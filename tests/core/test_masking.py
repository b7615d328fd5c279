"""core/masking.py: positions that skip padding, and cross-attention masks from per-query limits."""

import torch

from lmcompose.core.masking import cross_mask, positions_from_mask, same_position_limit


def test_positions_skip_left_padding_and_none_stays_none():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_mask(None) is None


def test_cross_mask_reads_a_prefix_and_never_padding():
    limit = torch.tensor([[1, 2, 4]])  # query t reads keys < limit[t]
    valid = torch.tensor([[1, 0, 1, 1]])
    mask = cross_mask(limit, valid, 4)
    assert mask.shape == (1, 1, 3, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 1]]
    assert cross_mask(limit, None, 4)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_same_position_limit_counts_from_the_offset():
    assert same_position_limit(2, 3, 4, torch.device("cpu")).tolist() == [[5, 6, 7], [5, 6, 7]]

"""core/padding.py: the one padding of every batch, where a row sits, and the pad id."""

from types import SimpleNamespace

import pytest
import torch

from lmcompose.core.padding import IGNORE_INDEX, pad_rows, pad_token_id, row_slice


def test_rows_are_padded_on_the_side_asked_with_a_mask_of_their_own_entries():
    ids, mask = pad_rows([[5, 6, 7], [8]], 0, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8], []], IGNORE_INDEX, "left")
    assert ids.tolist() == [[5, 6, 7], [-100, -100, 8], [-100] * 3] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, _ = pad_rows([torch.tensor([1, 2]), torch.tensor([3])], 9)  # tensors as rows
    assert ids.tolist() == [[1, 2], [3, 9]]


def test_row_slice_and_a_bad_side():
    assert row_slice(2, 5, "left") == slice(3, 5) and row_slice(2, 5, "right") == slice(0, 2)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        pad_rows([[1]], 0, "middle")


def test_pad_id_is_the_tokenizers_pad_else_its_eos_else_the_models_else_zero():
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=4)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=4)) == 4
    model = SimpleNamespace(anchor=SimpleNamespace(config=SimpleNamespace(pad_token_id=None, eos_token_id=[7, 8])))
    assert pad_token_id(None, model) == 7
    assert pad_token_id() == 0

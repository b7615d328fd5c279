"""io/input_checks.py: examples longer than the models read are refused before any work, naming file and line."""

import pytest

from lmcompose import ComposedModel
from lmcompose.io.datasets import TokenizedDataset, load_dataset
from lmcompose.io.input_checks import check_example_lengths, composed_context_length, context_length
from lmcompose.io.jsonl import DataError
from lmcompose.testing import tiny_causal_lm

from helpers import VOCAB, char_tokenizer, write_jsonl


def test_the_smallest_context_of_the_models_that_read_the_anchors_ids():
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, max_positions=64)
    augment = tiny_causal_lm("gpt2", vocab_size=VOCAB, max_positions=32)  # GPT-2 calls it n_positions
    assert context_length(anchor) == 64 and context_length(augment) == 32
    assert composed_context_length(ComposedModel(anchor, augment)) == (32, "augment")
    assert composed_context_length(ComposedModel(augment, anchor)) == (32, "anchor")


def test_a_too_long_example_is_refused_naming_its_file_and_line(tmp_path):
    model = ComposedModel(tiny_causal_lm("llama", vocab_size=VOCAB, max_positions=16),
                          tiny_causal_lm("llama", vocab_size=VOCAB, max_positions=512))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "much too long for sixteen positions"}])
    data = load_dataset(path, char_tokenizer())
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: the example has \d+ tokens but the anchor reads at most 16 "
                                        r"\(config\.max_position_embeddings\); 1 example\(s\) are longer"):
        check_example_lengths(data, model)
    fine = load_dataset(path, char_tokenizer(), max_length=16)
    check_example_lengths(fine, model)  # truncated to fit: accepted
    with pytest.raises(DataError, match="the training data, example 0"):
        check_example_lengths(TokenizedDataset.from_token_ids([list(range(20))]), model, "the training data")

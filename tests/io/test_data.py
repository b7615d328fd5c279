"""io/jsonl.py, io/datasets.py, io/collate.py: reading JSONL, tokenizing with label masks, batching."""

import logging

import pytest
import torch

from lmcompose.core.padding import IGNORE_INDEX
from lmcompose.core.tokens import adds_bos
from lmcompose.io.collate import Collator
from lmcompose.io.datasets import TokenizedDataset, load_dataset
from lmcompose.io.jsonl import DataError, read_jsonl

from helpers import char_tokenizer, write_jsonl


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_tokens_carry_no_loss_and_completions_end_with_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab =>", "completion": " ba"}, {"prompt": "c", "completion": "d"}])
    data = load_dataset(path, tok)
    prompt, completion = [tok.bos_token_id] + ids_of(tok, "ab =>"), ids_of(tok, " ba") + [tok.eos_token_id]
    assert data[0]["input_ids"] == prompt + completion
    assert data[0]["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert data.prompt_ids(0) == prompt
    assert data.references == [" ba", "d"] and data.has_completions
    assert data.num_truncated == 0


def test_bos_only_when_the_tokenizer_adds_one_by_default(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}])
    with_bos, without_bos = char_tokenizer(add_bos=True), char_tokenizer(add_bos=False)
    assert adds_bos(with_bos) and not adds_bos(without_bos)
    assert load_dataset(path, with_bos)[0]["input_ids"] == [0] + ids_of(with_bos, "abc") + [1]
    assert load_dataset(path, without_bos)[0]["input_ids"] == ids_of(without_bos, "abc") + [1]


def test_text_records_have_loss_on_every_token(tmp_path, tok):
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}]), tok)
    assert data[0]["labels"] == data[0]["input_ids"]
    assert data[0]["input_ids"][-1] == tok.eos_token_id
    assert not data.has_completions


def test_truncation_is_counted_returned_and_logged(tmp_path, tok, caplog):
    records = [
        {"prompt": "ab", "completion": "cd"},  # 1 + 2 + 2 + 1 = 6 tokens: fits
        {"prompt": "abcd", "completion": "efghij"},  # 12 tokens: cut, keeps completion tokens
        {"prompt": "abcdefghij", "completion": "k"},  # the prompt alone fills max_length: left out
    ]
    with caplog.at_level(logging.WARNING, logger="lmcompose.io.datasets"):
        data = load_dataset(write_jsonl(tmp_path / "d.jsonl", records), tok, max_length=8)
    assert (data.num_truncated, data.num_dropped, len(data)) == (2, 1, 2)
    assert all(len(data[i]["input_ids"]) <= 8 for i in range(len(data)))
    assert data[1]["input_ids"] == ([0] + ids_of(tok, "abcdefghij"))[:8]
    assert "2 of 3 examples were longer than max_length=8" in caplog.text
    assert "1 kept no completion token" in caplog.text


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_dynamically(side):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(pad_token_id=2, padding_side=side)(examples)
    assert batch["input_ids"].shape == (2, 3)  # padded to the longest example, not to a fixed length
    if side == "right":
        assert batch["input_ids"][1].tolist() == [8, 2, 2]
        assert batch["labels"][1].tolist() == [8, -100, -100]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    else:
        assert batch["input_ids"][1].tolist() == [2, 2, 8]
        assert batch["labels"][1].tolist() == [-100, -100, 8]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"][0].tolist() == [-100, 6, 7]


def test_collator_pads_augment_states_like_the_ids():
    states = [[{3: torch.ones(3, 4)}], [{3: torch.full((1, 4), 2.0)}]]
    examples = [{"input_ids": [5, 6, 7], "augment_states": states[0]}, {"input_ids": [8], "augment_states": states[1]}]
    batch = Collator(0, "left")(examples)
    padded = batch["augment_states"][0][3]
    assert padded.shape == (2, 3, 4)
    assert torch.equal(padded[0], torch.ones(3, 4))
    assert torch.equal(padded[1, 2], torch.full((4,), 2.0)) and not padded[1, :2].any()


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '], r"d\.jsonl, line 2: not valid JSON"),
        (['{"prompt": "a"}'], r'line 1: missing field "completion"'),
        (['{"prompt": "a", "completion": 3}'], r'line 1: "completion" must be a string, got int'),
        (['{"question": "a"}'], r'line 1: expected fields "prompt" and "completion", or "text"'),
        (['["a", "b"]'], r"line 1: expected a JSON object, got list"),
        (['{"text": "a", "prompt": "b", "completion": "c"}'], r'line 1: give either "text" or "prompt"/"completion"'),
        (['{"text": "a"}', "", '{"prompt": "a", "completion": "b"}'], r"line 3: a \{\"prompt\", \"completion\"\} record, but line 1"),
        ([], r"d\.jsonl: the file holds no examples"),
        (["", "  "], r"the file holds no examples"),
    ],
)
def test_malformed_files_are_refused_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_file_and_empty_token_data_are_refused(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl: no such data file"):
        read_jsonl(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="No examples"):
        TokenizedDataset([])

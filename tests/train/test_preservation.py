"""train/preservation.py and the recipe's preservation option: the KL from the anchor on ordinary text."""

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.io.collate import Collator
from lmcompose.io.datasets import TokenizedDataset, WithPreservation
from lmcompose.train import TrainingConfig, train
from lmcompose.train.evaluation import token_kl_sum
from lmcompose.train.preservation import preservation_kl_sum
from lmcompose.train.run_log import read_metrics

from helpers import composition_weights, randomize_composition, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def ordinary(tok, n=6):
    texts = ["the cat sat on the mat", "a b c d e f g", "numbers 1 2 3 4", "hello there world", "one more line",
             "zz yy xx ww"]
    return TokenizedDataset.from_token_ids([tok(t)["input_ids"] for t in texts[:n]])


def test_kl_is_zero_for_equal_logits_and_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl, n = token_kl_sum(a, a.clone(), mask)
    assert kl.item() == 0.0 and n.item() == 5
    p, logq = a.softmax(-1), b.log_softmax(-1)
    expected = (p * (p.log() - logq)).sum(-1)[mask.bool()].sum()
    assert torch.allclose(token_kl_sum(a, b, mask)[0], expected, atol=1e-6)


def test_preservation_rows_ride_with_their_examples_and_carry_no_labels(tok):
    data = TokenizedDataset.from_token_ids([[5, 6, 7], [8, 9], [10]])
    preserve = TokenizedDataset.from_token_ids([[20, 21], [22], [23, 24, 25]])
    wrapped = WithPreservation(data, preserve, ratio=0.5)  # example i carries texts floor(i/2) .. floor((i+1)/2)-1
    assert [wrapped[i]["preserve"] for i in range(3)] == [[], [[20, 21]], []]
    assert [WithPreservation(data, preserve, 2.0)[i]["preserve"] for i in (1, 2)] == [[[23, 24, 25], [20, 21]], [[22], [23, 24, 25]]]
    batch = Collator(pad_token_id=0)([wrapped[0], wrapped[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [20, 21, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, -100], [-100, -100, -100]]
    assert batch["preserve_rows"].tolist() == [False, False, True]


def test_the_kl_term_is_zero_at_initialisation_and_positive_once_the_composition_moves(tok):
    model = ComposedModel(*tiny_pair(), CompositionConfig(null_attention=True))
    batch = Collator(pad_token_id=2)([{"input_ids": [0, 5, 6], "preserve": [list(ordinary(tok)[0]["input_ids"])]}])
    rows = batch.pop("preserve_rows")
    logits = model(**batch).logits
    assert preservation_kl_sum(model, batch, logits, rows)[0].item() == 0.0  # the composed model is the anchor
    randomize_composition(model)
    kl, _ = preservation_kl_sum(model, batch, model(**batch).logits, rows)
    assert kl.item() > 0 and kl.requires_grad


def test_weight_zero_trains_exactly_as_without_preservation_and_a_weight_adds_the_kl(tmp_path, tok, data):
    config = dict(max_steps=4, batch_size=4, learning_rate=1e-2, seed=1, log_every=1, progress_bar=False,
                  eval_generate=False)
    runs = {}
    for name, weight, preserve in (("plain", 0.0, None), ("zero", 0.0, ordinary(tok)), ("kl", 1.0, ordinary(tok))):
        torch.manual_seed(0)
        model = ComposedModel(*tiny_pair())
        train(model, data, None, TrainingConfig(preserve_weight=weight, **config), tmp_path / name,
              preserve_dataset=preserve)
        runs[name] = (composition_weights(model), read_metrics(tmp_path / name / "metrics.jsonl"))
    plain, zero, kl = runs["plain"], runs["zero"], runs["kl"]
    assert all(torch.equal(plain[0][k], zero[0][k]) for k in plain[0])
    assert not all(torch.equal(plain[0][k], kl[0][k]) for k in plain[0])
    trained = [r for r in kl[1] if r["kind"] == "train"]
    assert all("preserve_kl" in r for r in trained) and trained[0]["preserve_kl"] == 0.0  # step 1 starts at the anchor
    assert all("preserve_kl" not in r for r in plain[1] if r["kind"] == "train")


def test_a_weight_without_texts_and_texts_with_the_augment_cache_are_refused(tmp_path, tok, data):
    model = ComposedModel(*tiny_pair())
    with pytest.raises(ValueError, match=r"preserve_weight \(--preserve-weight\) needs preservation texts"):
        train(model, data, None, TrainingConfig(preserve_weight=1.0, max_steps=1), tmp_path / "a")
    with pytest.raises(ValueError, match="does not work with preservation texts"):
        train(model, data, None, TrainingConfig(preserve_weight=1.0, max_steps=1, cache_augment_states=True),
              tmp_path / "b", preserve_dataset=ordinary(tok))

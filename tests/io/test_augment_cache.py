import numpy as np
import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.io.augment_cache import MANIFEST_NAME, WithAugmentStates, open_or_build_cache
from lmcompose.io.collate import Collator
from lmcompose.io.datasets import TokenizedDataset
from lmcompose.testing import tiny_causal_lm
from lmcompose.train.recipe import TrainingConfig, train
from lmcompose.train.run_log import read_metrics

from helpers import VOCAB, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def ragged_data(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 15, (n,), generator=gen).tolist()
    return TokenizedDataset.from_token_ids([torch.randint(4, VOCAB, (t,), generator=gen).tolist() for t in lengths])


def two_augment_model(augment_seed=2):
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=1)
    first = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48, num_layers=4, seed=augment_seed)
    second = tiny_causal_lm("gpt2", vocab_size=VOCAB, hidden_size=24, num_layers=2, num_heads=2, seed=3)
    return ComposedModel(anchor, [first, second], CompositionConfig(connections=[[(1, 0), (3, 1)], [(1, 1)]]))


def test_cached_states_are_each_example_run_alone(tmp_path):
    # float64: a padded batch and one example alone sum over other lengths, which float32 rounds differently
    model, data = two_augment_model().double(), ragged_data()
    cache, built = open_or_build_cache(model, data, tmp_path / "cache", batch_size=4)
    assert built and len(cache) == len(data)
    total = sum(len(data[i]["input_ids"]) for i in range(len(data)))
    stored = np.load(tmp_path / "cache" / "augment0_layer3.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.shape == (total, 48)  # unpadded, back to back
    for i in range(len(data)):
        ids = torch.tensor([data[i]["input_ids"]])
        for a, layers in enumerate(cache.states(i)):
            alone = model.augment_hidden(a, ids)
            assert sorted(layers) == sorted(alone)
            for layer, x in layers.items():
                assert x.shape == (ids.shape[1], alone[layer].shape[-1])
                assert x.dtype == torch.float64 and torch.allclose(x, alone[layer][0], atol=1e-10), (i, a, layer)


def test_cache_is_reused_only_for_the_same_data_and_augments(tmp_path):
    model, data = two_augment_model(), ragged_data()
    open_or_build_cache(model, data, tmp_path / "cache")
    stamp = (tmp_path / "cache" / MANIFEST_NAME).stat().st_mtime_ns
    assert open_or_build_cache(model, data, tmp_path / "cache")[1] is False
    assert (tmp_path / "cache" / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert open_or_build_cache(model, ragged_data(seed=5), tmp_path / "cache")[1] is True  # other data
    assert open_or_build_cache(two_augment_model(augment_seed=9), data, tmp_path / "cache")[1] is True  # other augment
    assert open_or_build_cache(model, data, tmp_path / "cache", precision="bf16")[1] is True  # other autocast


def test_bfloat16_states_are_stored_bit_exact(tmp_path):
    anchor, augment = tiny_pair()
    model = ComposedModel(anchor.to(torch.bfloat16), augment.to(torch.bfloat16))
    data = ragged_data(4)
    cache, _ = open_or_build_cache(model, data, tmp_path / "cache", batch_size=1)
    for i in range(len(data)):
        alone = model.augment_hidden(0, torch.tensor([data[i]["input_ids"]]))
        for layer, x in cache.states(i)[0].items():
            assert x.dtype == torch.bfloat16 and torch.equal(x, alone[layer][0])


def test_forward_with_cached_states_equals_the_plain_forward(tmp_path):
    model, data = two_augment_model().double(), ragged_data()  # float64 as above
    with torch.no_grad():
        for p in model.composition_parameters():
            p.normal_(0, 0.2)  # a trained-looking composition, so the augments matter
    cache, _ = open_or_build_cache(model, data, tmp_path / "cache")
    for side in ("right", "left"):
        collate = Collator(0, side)
        batch = collate([WithAugmentStates(data, cache)[i] for i in range(5)])
        with torch.no_grad():
            plain = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
            cached = model(batch["input_ids"], batch["attention_mask"], batch["labels"], augment_states=batch["augment_states"])
        real = batch["attention_mask"].bool()
        assert torch.allclose(cached.logits[real], plain.logits[real], atol=1e-10)
        assert torch.allclose(cached.loss, plain.loss, atol=1e-10)


def test_training_with_the_cache_gives_the_losses_of_training_without(tmp_path):
    data = ragged_data(12)
    runs = {}
    for cached in (False, True):
        anchor, augment = tiny_pair()
        model = ComposedModel(anchor, augment)
        config = TrainingConfig(
            max_steps=5, batch_size=4, learning_rate=1e-2, log_every=1, progress_bar=False, cpu=True, cache_augment_states=cached
        )
        train(model, data, ragged_data(4, seed=7), config, tmp_path / str(cached))
        runs[cached] = (read_metrics(tmp_path / str(cached) / "metrics.jsonl"), model.composition_state_dict())
    (plain, plain_weights), (cached, cached_weights) = runs[False], runs[True]
    assert [r["kind"] for r in cached if r["kind"] == "cache"] == ["cache"]
    losses = {k: [r["loss"] for r in records if r["kind"] == "train"] for k, records in (("plain", plain), ("cached", cached))}
    assert len(losses["plain"]) == 5 and losses["cached"] == pytest.approx(losses["plain"], rel=1e-5)
    eval_loss = {k: [r["eval_loss"] for r in records if r["kind"] == "eval"] for k, records in (("p", plain), ("c", cached))}
    assert eval_loss["c"] == pytest.approx(eval_loss["p"], rel=1e-5)
    for k, v in plain_weights.items():
        assert torch.allclose(cached_weights[k], v, atol=1e-4), k
    assert (tmp_path / "True" / "augment_cache" / "train" / MANIFEST_NAME).is_file()

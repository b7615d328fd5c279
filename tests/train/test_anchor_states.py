"""The anchor's lower blocks replayed (model/anchor_prefix.py) and the training run's anchor-state cache
(train/anchor_states.py, ``cache_anchor_states``)."""

import shutil

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.io.datasets import TokenizedDataset, tokenize_records
from lmcompose.testing import TINY_FAMILIES, tiny_causal_lm
from lmcompose.train import TrainingConfig, train
from lmcompose.train.anchor_states import AnchorStateCache
from lmcompose.train.run_log import read_metrics

from helpers import (
    VOCAB,
    composition_weights,
    randomize_composition,
    reverse_records,
    reverse_task,
    save_bases,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONNECTIONS = [[1, 2], [3, 3]]  # the lowest at anchor block 2: blocks 0-2 are the prefix


def composed(family="llama", connections=CONNECTIONS):
    anchor = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, seed=1)
    augment = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=48, num_layers=4, num_heads=4, seed=2)
    torch.manual_seed(0)
    return ComposedModel(anchor, augment, CompositionConfig(connections=connections))


def padded_batch():
    ids = torch.randint(4, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_replayed_prefix_gives_the_logits_and_gradients_of_the_full_forward(family):
    model = composed(family)
    randomize_composition(model, std=0.05)
    model.train()
    ids, mask = padded_batch()
    keep = mask.bool()
    prefix = model.anchor_prefix(ids, mask)
    assert prefix.layer == 2 and prefix.states.shape == (3, 7, 32)
    results = []
    for given in (None, prefix):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, anchor_prefix=given).logits
        logits[keep].square().sum().backward()
        with torch.no_grad(), model.disable_composition():
            alone = model(input_ids=ids, attention_mask=mask, use_cache=False, anchor_prefix=given).logits
        results.append((logits.detach()[keep], alone[keep], [p.grad.clone() for p in model.composition_parameters()]))
    (full, full_alone, full_grads), (replayed, replayed_alone, replayed_grads) = results
    assert torch.equal(full, replayed) and torch.equal(full_alone, replayed_alone)
    assert all(torch.equal(a, b) for a, b in zip(full_grads, replayed_grads))
    assert not torch.equal(full, full_alone)  # the composition acts above the prefix


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_anchors_forward_gives_its_own_logits_and_the_prefix_a_composition_replays(family):
    from lmcompose.core.masking import positions_from_mask
    from lmcompose.model.anchor_prefix import forward_with_prefix

    model = composed(family)
    randomize_composition(model, std=0.05)
    ids, mask = padded_batch()
    keep = mask.bool()
    output, prefix = forward_with_prefix(model.anchor, model.anchor_prefix_layer, ids, mask)
    alone = model.anchor(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    assert torch.equal(output.logits[keep], alone.logits[keep])
    computed = model.anchor_prefix(ids, mask)
    assert prefix.layer == computed.layer == 2 and prefix.arity == computed.arity
    assert torch.equal(prefix.states[keep], computed.states[keep])
    with torch.no_grad():
        replayed = model(input_ids=ids, attention_mask=mask, use_cache=False, anchor_prefix=prefix).logits
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(replayed[keep], full[keep])


def test_the_cache_fills_in_a_fixed_order_replays_either_padding_and_computes_a_new_text_alone():
    model = composed()
    ids, mask = padded_batch()
    texts = [ids[b, : int(mask[b].sum())].tolist() for b in range(3)] + [[9, 8, 7, 6, 5]]  # two of length 5
    caches = [AnchorStateCache(model), AnchorStateCache(model)]
    caches[0].fill(model.anchor, texts)
    caches[1].fill(model.anchor, texts[::-1] + texts)  # another order, repeats: the same states
    assert caches[0].states.keys() == caches[1].states.keys() and len(caches[0].states) == 4
    assert all(torch.equal(caches[0].states[k], caches[1].states[k]) for k in caches[0].states)
    cache = caches[0]
    right = cache.prefix(model.anchor, ids, mask)
    left = torch.zeros_like(ids), torch.zeros_like(mask)  # the same texts padded on the left
    for b, text in enumerate(texts[:3]):
        left[0][b, 7 - len(text):], left[1][b, 7 - len(text):] = torch.tensor(text), 1
    again = cache.prefix(model.anchor, *left)
    assert cache.tokens == 5 + 6 + 7 + 5  # nothing computed twice
    for b, text in enumerate(texts[:3]):
        n = len(text)
        assert torch.equal(right.states[b, :n], cache.states[tuple(text)]) and not right.states[b, n:].any()
        assert torch.equal(again.states[b, 7 - n:], cache.states[tuple(text)]) and not again.states[b, : 7 - n].any()
    alone = model.anchor_prefix(ids[:1, :5], mask[:1, :5]).states[0]  # text 0 alone, unpadded
    assert torch.allclose(cache.states[tuple(texts[0])], alone, atol=1e-5)  # filled with text 3 beside it
    new = torch.tensor([[11, 12, 13, 14]])
    assert torch.equal(cache.prefix(model.anchor, new, torch.ones_like(new)).states[0],
                       model.anchor_prefix(new, torch.ones_like(new)).states[0])


def reverse_data(tok):
    return tokenize_records(reverse_records(14, seed=0), tok)


def ordinary(tok):
    texts = ["the cat sat on the mat", "a b c d e f g", "numbers 1 2 3 4", "hello there world"]
    return TokenizedDataset.from_token_ids([tok(t)["input_ids"] for t in texts])


def run_config(**overrides):
    base = dict(max_steps=6, batch_size=4, learning_rate=1e-2, seed=1, log_every=1, progress_bar=False,
                eval_generate=False, cpu=True, preserve_weight=1.0, preserve_ratio=0.5)
    return TrainingConfig(**{**base, **overrides})


def test_training_with_the_cache_follows_the_plain_run_and_leaves_the_anchor_untouched(tmp_path, tok):
    runs = {}
    for cached in (False, True):
        model = composed()
        anchor_before = {k: v.clone() for k, v in model.anchor.state_dict().items()}
        train(model, reverse_data(tok), None, run_config(cache_anchor_states=cached), tmp_path / str(cached),
              preserve_dataset=ordinary(tok))
        assert all(torch.equal(v, model.anchor.state_dict()[k]) for k, v in anchor_before.items())
        runs[cached] = (composition_weights(model), read_metrics(tmp_path / str(cached) / "metrics.jsonl"))
    (plain, plain_log), (cached, cached_log) = runs[False], runs[True]
    for k, v in plain.items():  # each text's states computed alone, not in its batch: float rounding apart
        assert torch.allclose(cached[k], v, atol=1e-5, rtol=0), (k, (cached[k] - v).abs().max())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in plain.items() if ".out." in k)  # it trained
    losses = [[r[key] for r in log if r["kind"] == "train" for key in ("loss", "preserve_kl")]
              for log in (plain_log, cached_log)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)


def test_a_resumed_run_with_the_cache_ends_with_the_uninterrupted_weights(tmp_path, tok):
    config = run_config(save_every=1, keep_last=10, cache_anchor_states=True)
    straight = composed()
    train(straight, reverse_data(tok), None, config, tmp_path / "straight", preserve_dataset=ordinary(tok))
    run = tmp_path / "interrupted"
    train(composed(), reverse_data(tok), None, config, run, preserve_dataset=ordinary(tok))
    for step in range(4, 7):  # as if killed after the checkpoint of step 3: the new process's cache starts empty
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    shutil.rmtree(run / "composition")
    resumed = composed()
    result = train(resumed, reverse_data(tok), None, config, run, resume=True, preserve_dataset=ordinary(tok))
    assert result.resumed_from.name == "step-3"
    for k, v in straight.composition_state_dict().items():
        assert torch.equal(resumed.composition_state_dict()[k], v), k


def test_what_the_cache_cannot_replay_is_refused_in_one_line(tmp_path, tok):
    with pytest.raises(ValueError, match=r"adds to the anchor's embeddings \(anchor layer -1\)"):
        train(composed(connections=[[1, -1], [3, 3]]), reverse_data(tok), None,
              run_config(cache_anchor_states=True, preserve_weight=0.0), tmp_path / "embeddings")
    assert not (tmp_path / "embeddings").exists()  # refused before anything is written
    model = composed()
    model.anchor.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk"}  # as accelerate marks a split
    with pytest.raises(ValueError, match="needs the anchor's lower blocks on one device"):
        AnchorStateCache(model)
    del model.anchor.hf_device_map
    ids, mask = padded_batch()
    prefix = model.anchor_prefix(ids, mask)
    with pytest.raises(ValueError, match="compute them on the same batch"):
        model(input_ids=ids[:2], attention_mask=mask[:2], use_cache=False, anchor_prefix=prefix)
    with pytest.raises(ValueError, match="pass no cache and use_cache=False"):
        model(input_ids=ids, attention_mask=mask, use_cache=True, anchor_prefix=prefix)
    higher = ComposedModel(model.anchor, model.augments[0], CompositionConfig(connections=[[1, 1], [3, 3]]))
    with pytest.raises(ValueError, match="above the lowest connection"):
        higher(input_ids=ids, attention_mask=mask, use_cache=False, anchor_prefix=prefix)


def test_the_command_line_trains_with_the_cache_and_refuses_it_in_one_line_where_it_cannot_apply(tmp_path, capsys):
    from lmcompose.cli import main

    anchor, augment = save_bases(tmp_path)  # the anchor has 2 blocks
    common = ["train", "--anchor", str(anchor), "--augment", str(augment), "--data",
              str(write_jsonl(tmp_path / "train.jsonl", reverse_task(8, seed=0))), "--batch-size", "4", "--lr", "1e-2",
              "--no-progress", "--cpu", "--max-steps", "2", "--cache-anchor-states"]
    assert main(common + ["--connections", "1:1,3:1", "--output", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "composition").is_dir()
    capsys.readouterr()
    assert main(common + ["--connections", "1:-1,3:1", "--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "adds to the anchor's embeddings (anchor layer -1)" in err.splitlines()[-1], err
    assert not (tmp_path / "refused").exists()

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core.masking import positions_from_mask
from lmcompose.testing import tiny_causal_lm

from helpers import randomize_composition

FAMILIES = ["llama", "gpt2", "qwen2", "gpt_neox", "phi", "opt", "falcon", "gemma"]


def pair(anchor_family="llama", augment_family="llama", **kw):
    # Anchor and augment differ in width, depth and head count.
    anchor = tiny_causal_lm(anchor_family, hidden_size=48, num_layers=4, num_heads=6, seed=1)
    augment = tiny_causal_lm(augment_family, hidden_size=32, num_layers=8, num_heads=4, seed=2)
    return anchor, augment, ComposedModel(anchor, augment, CompositionConfig(**kw))


def padded(ids, pad_id, side, extra):
    """Pad one sequence (1, t) with ``extra`` pad tokens on ``side``; returns ids and mask."""
    pad = torch.full((1, extra), pad_id, dtype=ids.dtype)
    ones, zeros = torch.ones_like(ids), torch.zeros_like(pad)
    if side == "left":
        return torch.cat([pad, ids], 1), torch.cat([zeros, ones], 1)
    return torch.cat([ids, pad], 1), torch.cat([ones, zeros], 1)


@pytest.mark.parametrize("anchor_family", FAMILIES)
def test_identity_at_init_for_every_family_as_anchor(anchor_family):
    anchor, _, model = pair(anchor_family, "llama")
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        assert (model(ids).logits - anchor(ids).logits).abs().max().item() <= 1e-6
        # With padding the composed model derives positions from the mask (as transformers' generate does),
        # so padding never shifts a sequence's positions; the anchor given those positions is the reference.
        expected = anchor(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        got = model(ids, attention_mask=mask).logits
        assert (got - expected).abs().max().item() <= 1e-6
        # and the padded row equals the unpadded sequence run alone (float64: other lengths round differently)
        model.double()
        got, alone = model(ids, attention_mask=mask).logits, anchor(ids[1:, 3:]).logits
        assert (got[1, 3:] - alone[0]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("augment_family", FAMILIES)
def test_identity_at_init_for_every_family_as_augment(augment_family):
    anchor, _, model = pair("gpt2", augment_family)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert (model(ids).logits - anchor(ids).logits).abs().max().item() <= 1e-6


@pytest.mark.parametrize("anchor_family,augment_family", [("llama", "gpt2"), ("gpt_neox", "qwen2"), ("phi", "llama")])
def test_no_future_token_leaks(anchor_family, augment_family):
    _, _, model = pair(anchor_family, augment_family)
    randomize_composition(model)
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
        for t in (4, 9, 15):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 7) % 125 + 3
            logits = model(changed).logits
            assert torch.equal(logits[:, :t], base[:, :t]) or (logits[:, :t] - base[:, :t]).abs().max() < 1e-5
            assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-4  # the change is seen from t on


def test_composition_changes_the_output_once_trained_weights_are_nonzero():
    anchor, _, model = pair()
    randomize_composition(model)
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        assert (model(ids).logits - anchor(ids).logits).abs().max() > 1e-3
        with model.disable_composition():
            assert torch.equal(model(ids).logits, anchor(ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("anchor_family,augment_family", [("llama", "llama"), ("gpt2", "gpt_neox"), ("qwen2", "phi")])
def test_padding_gives_the_unpadded_results(side, anchor_family, augment_family):
    _, _, model = pair(anchor_family, augment_family)
    randomize_composition(model)
    model.double()  # a padded batch and one sequence alone sum over other lengths: float32 rounds them differently
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        alone = model(ids).logits[0]  # (9, V)
        padded_ids, mask = padded(ids, 2, side, 4)
        other = torch.randint(3, 128, (1, 13))
        batch = torch.cat([padded_ids, other])
        batch_mask = torch.cat([mask, torch.ones_like(other)])
        logits = model(batch, attention_mask=batch_mask).logits[0]
        real = logits[mask[0].bool()]
        assert (real - alone).abs().max().item() < 1e-10


def test_training_moves_only_the_composition():
    anchor, augment, model = pair()
    bases = [("anchor." + n, p) for n, p in anchor.named_parameters()] + [
        ("augment." + n, p) for n, p in augment.named_parameters()
    ]
    before = {n: p.detach().clone() for n, p in bases}
    comp_before = {n: p.detach().clone() for n, p in model.connections.named_parameters()}
    optimiser = torch.optim.AdamW(model.composition_parameters(), lr=1e-2)
    model.train()
    assert not anchor.training and not augment.training
    ids = torch.randint(3, 128, (4, 12))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        for p in list(anchor.parameters()) + list(augment.parameters()):
            assert p.grad is None
        optimiser.step()
        optimiser.zero_grad()
    for n, p in bases:
        assert torch.equal(p, before[n]), n
        assert not p.requires_grad
    for n, p in model.connections.named_parameters():
        assert not torch.equal(p, comp_before[n]), f"{n} did not move"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.composition_parameters()}


@pytest.mark.parametrize("padded", [False, True])
def test_checkpointed_connections_give_the_same_loss_and_gradients_and_save_activations(padded):
    from torch.autograd.graph import saved_tensors_hooks

    anchor, augment, _ = pair()
    ids = torch.randint(3, 128, (4, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    results = []
    for recompute in (False, True):
        model = ComposedModel(anchor, augment, CompositionConfig(connections=[(0, 0), (2, 1)]),
                              checkpoint_connections=recompute)
        randomize_composition(model)
        model.train()
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        model.eval()  # outside training the connections are not checkpointed: the same tensors kept as without
        kept = []
        with saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            eval_logits = model(ids, attention_mask=mask).logits
        results.append((loss.detach(), [p.grad.clone() for p in model.composition_parameters()], sum(saved),
                        eval_logits.detach(), sum(kept)))
    (loss, grads, saved, logits, kept), (loss_c, grads_c, saved_c, logits_c, kept_c) = results
    assert torch.equal(logits, logits_c) and kept == kept_c
    assert torch.equal(loss, loss_c)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g, g_c, atol=1e-6, rtol=1e-5)
    assert saved_c < saved  # fewer activation elements kept for the backward pass


def test_augment_runs_without_a_graph():
    _, _, model = pair()
    states = model.augment_hidden(0, torch.randint(3, 128, (1, 5)))
    assert all(not s.requires_grad and s.grad_fn is None for s in states.values())


def test_bfloat16_composition_follows_the_anchor_dtype():
    anchor = tiny_causal_lm("llama", hidden_size=48, num_heads=6, seed=1).to(torch.bfloat16)
    augment = tiny_causal_lm("gpt2", hidden_size=32, num_layers=8, seed=2)  # float32 augment
    model = ComposedModel(anchor, augment)
    assert all(p.dtype == torch.bfloat16 for p in model.composition_parameters())
    ids = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, anchor(ids).logits)
    randomize_composition(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None for p in model.composition_parameters())


def test_several_augments_each_with_its_own_connections():
    anchor = tiny_causal_lm("llama", hidden_size=48, num_heads=6, seed=1)
    first = tiny_causal_lm("gpt2", hidden_size=32, num_layers=4, seed=2)
    second = tiny_causal_lm("qwen2", hidden_size=64, num_layers=2, num_heads=4, seed=3)
    config = CompositionConfig(connections=[[(1, 0), (3, 2)], [(0, 2)]])
    model = ComposedModel(anchor, [first, second], config)
    assert [len(c) for c in model.connections] == [2, 1]
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert (model(ids).logits - anchor(ids).logits).abs().max() <= 1e-6
        randomize_composition(model)
        both = model(ids).logits
        with torch.no_grad():
            model.connections[1][0].out.weight.zero_()
        only_first = model(ids).logits
    assert (both - only_first).abs().max() > 1e-3  # the second augment contributes


def test_summary_counts_trainable_parameters():
    anchor, augment, model = pair()  # D_B = 48, D_A = 32, two connections by default (8 augment layers // 4)
    d_b, d_a = 48, 32
    # per connection: augment norm, f_proj (weight and bias), anchor norm, W^Q, W^K, W^V, W^O (paper App. C + norms)
    per_connection = d_a + (d_a * d_b + d_b) + d_b + 4 * d_b * d_b
    bases = sum(p.numel() for p in anchor.parameters()) + sum(p.numel() for p in augment.parameters())
    assert sum(p.numel() for p in model.composition_parameters()) == 2 * per_connection
    total = bases + 2 * per_connection
    assert model.summary() == (f"trainable params: {2 * per_connection:,} || all params: {total:,} || trainable%: "
                               f"{100 * 2 * per_connection / total:.4f} || connections: 2")


def test_errors_at_the_boundary():
    anchor = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="vocabulary has 128 tokens but the augment model's has 64"):
        ComposedModel(anchor, tiny_causal_lm("llama", vocab_size=64))
    with pytest.raises(ValueError, match=r"valid anchor layers are 0\.\.3"):
        ComposedModel(anchor, tiny_causal_lm("gpt2"), CompositionConfig(connections=[(0, 4)]))
    with pytest.raises(TypeError, match="not a causal LM"):
        ComposedModel(anchor, anchor.model)
    with pytest.raises(ValueError, match="does not divide"):
        ComposedModel(anchor, tiny_causal_lm("gpt2"), CompositionConfig(num_heads=5))


@pytest.mark.parametrize("anchor_family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_embedding_connection_starts_as_the_anchor_and_leaks_no_future_token(anchor_family):
    anchor, _, model = pair(anchor_family, connections=[(3, -1), (7, 2)])
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, anchor(ids).logits)  # the update is zero at init
        randomize_composition(model)
        base = model(ids).logits
        changed = ids.clone()
        changed[:, 6] = (changed[:, 6] + 7) % 125 + 3
        logits = model(changed).logits
    assert (logits[:, :6] - base[:, :6]).abs().max() < 1e-5
    assert (logits[:, 6:] - base[:, 6:]).abs().max() > 1e-4


def test_embedding_connection_adds_its_update_to_the_first_blocks_input():
    anchor, _, model = pair(connections=[(3, -1)])  # llama: the first block's input is the token embeddings
    randomize_composition(model)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        (keys, values), = model.project(0, model.augment_hidden(0, ids))
        embeddings = anchor.get_input_embeddings()(ids)  # (b, t, D_B)
        delta = model.connections[0][0](embeddings, keys, values)  # causal: position t reads augment 0..t
        expected = anchor(inputs_embeds=embeddings + delta).logits
        assert delta.abs().max() > 1e-3
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_anchor_layers_below_the_embeddings_are_refused():
    with pytest.raises(ValueError, match=r"anchor layer -2 is out of range; valid anchor layers are 0\.\.3, or -1 for the embeddings"):
        pair(connections=[(0, -2)])

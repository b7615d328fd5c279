import pytest
import torch

from conftest import randomize_composition
from lmcompose import ComposedModel, CompositionConfig
from lmcompose.core.masking import positions_from_mask
from lmcompose.testing import tiny_causal_lm

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
        results.append((loss.detach(), [p.grad.clone() for p in model.composition_parameters()], sum(saved)))
        model.eval()
        with torch.no_grad():  # outside training nothing is checkpointed
            assert torch.allclose(model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    (loss, grads, saved), (loss_c, grads_c, saved_c) = results
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
    _, _, model = pair()
    trainable = sum(p.numel() for p in model.composition_parameters())
    assert f"trainable params: {trainable:,}" in model.summary()
    assert "connections: 2" in model.summary()


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


@pytest.mark.parametrize("bias,norm", [(True, "rms"), (False, "rms"), (True, "layer"), (False, "none")])
def test_folded_key_value_projection_gives_the_same_keys_values_and_gradients(bias, norm, monkeypatch):
    from torch.autograd.graph import saved_tensors_hooks

    from lmcompose.core.cross_attention import CrossAttention

    torch.manual_seed(0)
    conn = CrossAttention(augment_dim=32, anchor_dim=48, num_heads=6, rotary=True, proj_bias=bias, augment_norm=norm)
    torch.nn.init.normal_(conn.out.weight, std=0.1)
    for p in conn.augment_norm.parameters():  # a norm weight and bias away from 1 and 0
        torch.nn.init.normal_(p, mean=0.5, std=0.3)
    augment_hidden, anchor_hidden = torch.randn(4, 40, 32), torch.randn(4, 40, 48)
    positions = torch.arange(40)[None].expand(4, -1)
    assert conn._folding_is_cheaper(4 * 40) and not conn._folding_is_cheaper(1)  # training batch vs one new token
    results = []
    for fold in (True, False):
        monkeypatch.setattr(CrossAttention, "_folding_is_cheaper", lambda self, tokens: fold)
        conn.zero_grad()
        saved = {}  # distinct tensors autograd keeps, by storage
        with saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.numel()) and t, lambda t: t):
            k, v = conn.project(augment_hidden, positions)
        conn(anchor_hidden, k, v, positions=positions).square().sum().backward()
        activations = sum(n for n in saved.values() if n >= 4 * 40 * 32)  # leave out weights and rotary angles
        results.append((k.detach(), v.detach(), {n: p.grad.clone() for n, p in conn.named_parameters()}, activations))
    (k_f, v_f, g_f, saved_f), (k_u, v_u, g_u, saved_u) = results
    assert torch.allclose(k_f, k_u, atol=1e-5) and torch.allclose(v_f, v_u, atol=1e-5)
    for name in g_u:
        assert torch.allclose(g_f[name], g_u[name], atol=1e-4, rtol=1e-4), name
    # the folded path keeps one (b, s, D_A) tensor; the unfolded one also the f_proj output (and the norm's input)
    assert saved_f == 4 * 40 * 32 and saved_u - saved_f >= 4 * 40 * 48, (saved_f, saved_u)
    with torch.no_grad():  # no gradient wanted (generation, evaluation): the unfolded path, whatever the size
        monkeypatch.undo()
        k_n, _ = conn.project(augment_hidden, positions)
    assert torch.equal(k_n, k_u)


def test_query_recomputed_in_backward_gives_the_same_gradients_and_keeps_less(monkeypatch):
    from torch.autograd.graph import saved_tensors_hooks

    from lmcompose.core.cross_attention import CrossAttention

    torch.manual_seed(0)
    conn = CrossAttention(augment_dim=32, anchor_dim=48, num_heads=6)
    torch.nn.init.normal_(conn.out.weight, std=0.1)
    augment_hidden = torch.randn(4, 40, 32)
    results = []
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(CrossAttention, "_query", CrossAttention._plain_query)
        conn.zero_grad()
        anchor_hidden = torch.randn(4, 40, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = conn(anchor_hidden, *conn.project(augment_hidden))
        out.square().sum().backward()
        results.append((out.detach(), anchor_hidden.grad, {n: p.grad.clone() for n, p in conn.named_parameters()}, sum(saved)))
    (out_r, dx_r, g_r, saved_r), (out_p, dx_p, g_p, saved_p) = results
    assert torch.equal(out_r, out_p)
    assert torch.allclose(dx_r, dx_p, atol=1e-6) and all(torch.allclose(g_r[n], g_p[n], atol=1e-6) for n in g_p)
    assert saved_p - saved_r >= 4 * 40 * 48  # the normalised anchor states are not kept


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

"""A composition that needs the augment: only the augment knows the key -> value table."""

import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.testing import tiny_causal_lm

KEYS = torch.arange(3, 35)  # 32 key tokens
VALUES = 35 + torch.randperm(32, generator=torch.Generator().manual_seed(0))  # a secret table: key i -> value


def batch(size, gen):
    """Sequences ``k v k v ...``; labels only on the value tokens."""
    keys = KEYS[torch.randint(0, 32, (size, 8), generator=gen)]  # (b, 8)
    values = VALUES[keys - 3]
    ids = torch.stack([keys, values], dim=-1).reshape(size, 16)  # (b, 16)
    labels = torch.full_like(ids, -100)
    labels[:, 1::2] = ids[:, 1::2]
    return ids, labels


def fit(parameters, loss_fn, steps, lr):
    optimiser = torch.optim.AdamW(parameters, lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids, labels = batch(32, gen)
        loss = loss_fn(ids, labels)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()


def test_composed_loss_falls_well_below_the_anchor_alone():
    torch.manual_seed(0)
    augment = tiny_causal_lm("llama", vocab_size=72, hidden_size=64, num_layers=2, num_heads=4, seed=3)
    augment.train()
    fit(augment.parameters(), lambda i, l: augment(i, labels=l).loss, steps=150, lr=3e-3)
    augment.eval()

    anchor = tiny_causal_lm("gpt2", vocab_size=72, hidden_size=64, num_layers=2, num_heads=4, seed=4)
    model = ComposedModel(anchor, augment, CompositionConfig(connections=[(1, 0)]))
    model.train()
    fit(model.composition_parameters(), lambda i, l: model(i, labels=l).loss, steps=150, lr=3e-3)

    # Control: the same composition over an untrained augment (the gain must come from its knowledge).
    untrained = tiny_causal_lm("llama", vocab_size=72, hidden_size=64, num_layers=2, num_heads=4, seed=5)
    control = ComposedModel(anchor, untrained, CompositionConfig(connections=[(1, 0)]))
    control.train()
    fit(control.composition_parameters(), lambda i, l: control(i, labels=l).loss, steps=150, lr=3e-3)

    ids, labels = batch(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        augment_loss = augment(ids, labels=labels).loss.item()
        anchor_loss = anchor(ids, labels=labels).loss.item()
        composed_loss = model(ids, labels=labels).loss.item()
        control_loss = control(ids, labels=labels).loss.item()
    assert augment_loss < 0.5, f"the augment did not learn the table: {augment_loss:.3f}"
    assert anchor_loss > 3.0  # the anchor cannot know the table (log 72 = 4.3)
    assert composed_loss < 0.25 * anchor_loss, (composed_loss, anchor_loss)
    assert composed_loss < 0.5 * control_loss, (composed_loss, control_loss)

"""train/objective.py: a micro-batch's loss computes the anchor's logits only where the loss reads them."""

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig
from lmcompose.io.collate import Collator
from lmcompose.model.hooks import head_at
from lmcompose.testing import tiny_causal_lm
from lmcompose.train.evaluation import token_loss_sum
from lmcompose.train.objective import micro_batch_loss, scored_positions
from lmcompose.train.preservation import preservation_kl_sum

from helpers import VOCAB, randomize_composition

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scored_positions_are_those_before_a_target_and_every_token_of_a_preservation_row():
    labels = torch.tensor([[-100, -100, 7, -100], [-100, 5, 6, -100], [-100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    rows = torch.tensor([False, False, True])
    assert scored_positions(labels, mask, rows).int().tolist() == [[0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert scored_positions(labels, mask, None)[2].sum() == 0


def test_the_head_computes_only_the_kept_positions_and_is_itself_again_afterwards():
    seen = []

    class Head(torch.nn.Linear):
        def forward(self, hidden):
            seen.append(tuple(hidden.shape))
            return super().forward(hidden)

    head = Head(4, 6)
    hidden = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    with head_at(head, keep):
        logits = head(hidden)
        assert head(hidden[:, -1:]).shape == (2, 1, 6)  # logits_to_keep's slice: the plain head
    assert seen == [(3, 4), (2, 1, 4)]  # the kept rows only, then the slice as it came
    assert torch.allclose(logits[keep], head(hidden)[keep]) and logits[~keep].abs().sum() == 0
    assert "forward" not in head.__dict__


def _full_loss(model, batch, totals, weight):
    """The micro-batch's loss the way it is defined: every position's logits, then the same sums."""
    batch = dict(batch)
    rows, labels = batch.pop("preserve_rows"), batch.pop("labels")
    logits = model(**batch).logits
    targets, positions = totals.tolist()
    return token_loss_sum(logits, labels)[0] / targets + weight * preservation_kl_sum(model, batch, logits, rows)[0] / positions


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "opt"])
def test_the_loss_and_its_gradients_equal_the_full_logits_ones(family):
    anchor = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    augment = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(null_attention=True))
    randomize_composition(model)
    model.train()
    batch = Collator(pad_token_id=2)([
        {"input_ids": [0, 5, 6, 7, 8], "labels": [-100, -100, -100, 7, 8]},
        {"input_ids": [0, 9, 10], "labels": [-100, -100, 10], "preserve": [[0, 11, 12, 13, 14, 15]]},
    ])
    totals = torch.tensor([3.0, 6.0], dtype=torch.float64)
    losses, grads = [], []
    for compute in (lambda: micro_batch_loss(model, model, batch, totals, 0.5, 1)[0],
                    lambda: _full_loss(model, batch, totals, 0.5)):
        model.zero_grad()
        loss = compute()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.composition_parameters()])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_plain_models_own_loss_and_every_gradient_are_unchanged_by_scoring_only_the_targets(family):
    model = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=3).eval()  # no dropout
    batch = Collator(pad_token_id=2)([{"input_ids": [0, 5, 6, 7], "labels": [-100, -100, -100, 7]},
                                      {"input_ids": [0, 9, 10, 11, 12], "labels": [-100, -100, -100, 11, 12]}])
    keep = scored_positions(batch["labels"], batch["attention_mask"], None)
    results = []
    for sparse in (True, False):
        model.zero_grad()
        if sparse:
            with head_at(model.get_output_embeddings(), keep):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (sparse_loss, sparse_grads), (loss, grads) = results
    assert torch.allclose(sparse_loss, loss, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(sparse_grads, grads))

"""model/hooks.py: capturing block outputs stops the forward after the highest block; updates are added, then gone."""

import pytest
import torch

from lmcompose.core import introspect
from lmcompose.model.hooks import capture_outputs, residual_updates
from lmcompose.testing import tiny_causal_lm


def test_capture_gives_the_block_outputs_and_runs_nothing_above_the_highest():
    model = tiny_causal_lm("llama", num_layers=4)
    blocks = introspect.decoder_blocks(model)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states  # hidden_states[i + 1] is block i's output
    before = [len(b._forward_hooks) for b in blocks]  # transformers records hidden states with hooks of its own
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        captured = capture_outputs(blocks, [1, 0, 1], lambda: model(ids))
        model(ids)
    assert sorted(captured) == [0, 1] and ran == [0, 1, 0, 1, 2, 3]
    assert torch.equal(captured[0], full[1]) and torch.equal(captured[1], full[2])
    assert [len(b._forward_hooks) for b in blocks] == [n + 1 for n in before]  # ours gone, the test's own left
    for h in handles:
        h.remove()


def test_updates_are_added_after_a_block_and_before_the_first_and_removed_after():
    model = tiny_causal_lm("gpt2", num_layers=3)
    blocks = introspect.decoder_blocks(model)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        plain = model(ids).logits
        with residual_updates(blocks, {1: lambda h: torch.ones_like(h)}):
            shifted = capture_outputs(blocks, [1, 2], lambda: model(ids))
        base = capture_outputs(blocks, [1, 2], lambda: model(ids))
        assert torch.allclose(shifted[1], base[1] + 1.0)  # block 1's output carries the update
        seen = []
        with residual_updates(blocks, {-1: lambda h: seen.append(h.shape) or torch.zeros_like(h)}):
            unchanged = model(ids).logits
        assert seen == [(1, 5, 32)] and torch.equal(unchanged, plain)  # layer -1: the first block's input
        assert torch.equal(model(ids).logits, plain)  # nothing left behind
    with pytest.raises(RuntimeError, match=r"Blocks \[2\] did not run"):
        capture_outputs(blocks, [2], lambda: None)

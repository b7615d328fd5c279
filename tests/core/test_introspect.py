import pytest
import torch
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from lmcompose.core import introspect
from lmcompose.testing import TINY_FAMILIES, tiny_causal_lm


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_blocks_sizes_and_heads_found_by_structure(family):
    model = tiny_causal_lm(family, hidden_size=48, num_layers=3, num_heads=6)
    blocks = introspect.decoder_blocks(model)
    assert len(blocks) == 3
    assert introspect.hidden_size(model) == 48
    assert introspect.num_attention_heads(model) == 6
    assert introspect.vocab_size(model) == 128
    # the blocks found are the ones the forward pass runs, in order
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    for h in handles:
        h.remove()
    assert seen == [0, 1, 2]


def test_norm_kind_matches_the_family():
    assert introspect.norm_kind(tiny_causal_lm("llama")) == "rms"
    assert introspect.norm_kind(tiny_causal_lm("gpt2")) == "layer"


@pytest.mark.parametrize(
    "model",
    [LlamaModel(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)),
     GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)),
     torch.nn.Linear(3, 3)],
)
def test_not_a_causal_lm_is_refused_with_advice(model):
    with pytest.raises(TypeError, match="causal LM"):
        introspect.check_causal_lm(model, "anchor")


def test_fingerprint_tells_weights_apart():
    a, b = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    fa, fb = introspect.fingerprint(a), introspect.fingerprint(b)
    samples = ("weight_signature", "weights_digest")
    assert {k: v for k, v in fa.items() if k not in samples} == {k: v for k, v in fb.items() if k not in samples}
    assert fa["weight_signature"] != fb["weight_signature"] and fa["weights_digest"] != fb["weights_digest"]


def test_the_weights_digest_sees_any_tensor_change_and_not_the_dtype():
    model = tiny_causal_lm("llama", seed=0)
    before = introspect.weights_digest(model)
    assert introspect.weights_digest(tiny_causal_lm("llama", seed=0)) == before
    blocks = introspect.decoder_blocks(model)
    with torch.no_grad():
        blocks[-1].mlp.down_proj.weight.mul_(1.5)  # one tensor of the last block, nowhere near the embeddings
    changed = introspect.weights_digest(model)
    assert changed != before and introspect.fingerprint(model)["weight_signature"] == introspect.fingerprint(
        tiny_causal_lm("llama", seed=0))["weight_signature"]  # the embedding sample alone would not see it
    assert introspect.weights_digest(model.to(torch.bfloat16)) == changed

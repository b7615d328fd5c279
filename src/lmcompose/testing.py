"""Tiny random causal LMs of eight transformers families: the models of the tests, the benchmarks and the
key-value demo's bases (built from scratch there)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Per family: the transformers config class name and how it names its sizes.
_FAMILIES: dict[str, str] = {
    "llama": "LlamaConfig",
    "gpt2": "GPT2Config",
    "qwen2": "Qwen2Config",
    "gpt_neox": "GPTNeoXConfig",
    "phi": "PhiConfig",
    "gemma": "GemmaConfig",
    "opt": "OPTConfig",
    "falcon": "FalconConfig",
}

TINY_FAMILIES = tuple(_FAMILIES)


def tiny_config(
    family: str,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 4,
    max_positions: int = 512,
    **overrides: Any,
) -> Any:
    """A small transformers config of ``family`` (one of :data:`TINY_FAMILIES`)."""
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(_FAMILIES)}")
    config_cls = getattr(transformers, _FAMILIES[family])
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if family in ("llama", "qwen2", "gemma", "phi", "gpt_neox", "opt"):
        kwargs["intermediate_size" if family != "opt" else "ffn_dim"] = 4 * hidden_size
    if family in ("llama", "qwen2", "gemma"):
        kwargs["num_key_value_heads"] = max(1, num_heads // 2)
    if family == "gemma":
        kwargs["head_dim"] = hidden_size // num_heads
    if family == "opt":
        kwargs["word_embed_proj_dim"] = hidden_size
    if family == "gpt2":
        kwargs["n_positions"] = max_positions
        kwargs.pop("max_position_embeddings")
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_causal_lm(family: str = "llama", *, seed: int = 0, init_std: float = 0.1, **sizes: Any) -> nn.Module:
    """A small randomly initialised causal LM of ``family``, in eval mode.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        seed: seed of the random weights.
        init_std: std of the weights (larger than transformers' 0.02 so logits are not all ties).
        **sizes: vocab_size, hidden_size, num_layers, num_heads, max_positions, or config overrides.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, initializer_range=init_std, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()

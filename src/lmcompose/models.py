"""Base models: tiny random causal LMs of several families (tests, benchmarks, demos)."""

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


def load_base(path: Any, dtype: Any = None) -> tuple[nn.Module, Any]:
    """Load a base causal LM and its tokenizer from ``path`` (in eval mode).

    ``path`` is a local transformers model directory (``save_pretrained`` of a model and its
    tokenizer). Each kind of source is one branch here; GGUF files are meant to become another.

    Args:
        path: the model directory.
        dtype: a torch dtype for the weights (e.g. ``torch.bfloat16``); None keeps the saved one.
    Returns:
        (model, tokenizer).
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: the path does not exist")
    if path.is_file() and path.suffix == ".gguf":
        raise NotImplementedError(f"{path}: GGUF files are not supported by load_base yet; give a transformers model directory")
    if not path.is_dir():
        raise ValueError(f"{path} is not a model directory (a directory written by save_pretrained)")
    return _load_transformers_dir(path, dtype)


def _load_transformers_dir(path: Any, dtype: Any) -> tuple[nn.Module, Any]:
    """A model directory written by ``save_pretrained`` (config.json, weights, tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no transformers model (no config.json); save one with save_pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot load a causal LM ({str(err).splitlines()[0]})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path} holds a model but no usable tokenizer ({str(err).splitlines()[0]})") from err
    return model.eval(), tokenizer

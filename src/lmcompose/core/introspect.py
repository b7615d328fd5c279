"""Find decoder blocks, hidden size, heads and norms of any transformers causal LM, by structure."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Optional

import torch
from torch import nn


def check_causal_lm(model: Any, role: str) -> None:
    """Raise a TypeError that says what to load instead when ``model`` is not a decoder-only causal LM."""
    name = type(model).__name__
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"The {role} model must be a transformers causal LM (e.g. from AutoModelForCausalLM), got {name}"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"The {role} model {name} is an encoder-decoder model; lmcompose composes decoder-only causal LMs")
    can_generate = getattr(model, "can_generate", None)
    if model.get_output_embeddings() is None or (callable(can_generate) and not can_generate()):
        raise TypeError(
            f"The {role} model {name} is not a causal LM (no language-model head). "
            "Load it with transformers.AutoModelForCausalLM.from_pretrained(...)"
        )


def text_config(model: nn.Module) -> Any:
    """The text part of a model's config (the config itself for plain LMs)."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for Llama, ``transformer.h`` for GPT-2, ...).

    Found by structure: the ModuleList of identical modules whose length is the config's layer count
    (the longest such list when the config does not say).
    """
    expected = getattr(text_config(model), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1:
                candidates.append((name, module))
    if not candidates:
        raise TypeError(f"Could not find a list of decoder blocks in {type(model).__name__}")
    matching = [c for c in candidates if len(c[1]) == expected]
    pool = matching or candidates
    # Prefer the shallowest match (the decoder itself, not a list nested inside a block).
    name, blocks = min(pool, key=lambda c: (c[0].count("."), -len(c[1])))
    return blocks


def decoder_blocks_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder blocks (``"model.layers."`` for Llama): block i's weights start with it
    followed by ``i.``."""
    blocks = decoder_blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_blocks(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream."""
    size = getattr(text_config(model), "hidden_size", None)
    if size is None:
        size = model.get_input_embeddings().embedding_dim
    return int(size)


def num_attention_heads(model: nn.Module) -> int:
    """Number of query heads of the model's self-attention."""
    heads = getattr(text_config(model), "num_attention_heads", None)
    if heads is None:
        raise TypeError(f"Cannot tell the number of attention heads of {type(model).__name__}; pass num_heads=")
    return int(heads)


def vocab_size(model: nn.Module) -> int:
    """Vocabulary size from the config (the embedding may be padded beyond it)."""
    size = getattr(text_config(model), "vocab_size", None)
    return int(size) if size is not None else model.get_input_embeddings().num_embeddings


def norm_kind(model: nn.Module) -> str:
    """"rms" when the model's blocks use an RMSNorm, else "layer" (LayerNorm)."""
    block = decoder_blocks(model)[0]
    for module in block.modules():
        if "rmsnorm" in type(module).__name__.lower():
            return "rms"
    return "layer"


def norm_eps(model: nn.Module) -> float:
    """The epsilon of the model's own norms."""
    config = text_config(model)
    for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 1e-5


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether the model's forward takes ``argument`` by name."""
    params = inspect.signature(model.forward).parameters
    return argument in params


def forward_kwargs(
    model: nn.Module, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]
) -> dict[str, Any]:
    """The mask and positions as keyword arguments of ``model``'s forward (positions only where it takes them)."""
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None and accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids
    return kwargs


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of the model's forward (``cache`` in transformers 5, else ``past_key_values``)."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def new_cache(model: nn.Module) -> Any:
    """An empty transformers KV cache for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of a transformers KV cache.

    A negative argument to ``crop`` removes that many positions in every transformers version.
    """
    current = cache.get_seq_length()
    if length < current:
        cache.crop(length - current)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


EMPTY_ON = "lmcompose_empty_on"  # on each module of a model built without its weights: the device they will fill


def execution_device(module: nn.Module, name: str = "module") -> torch.device:
    """Where ``module`` computes: the execution device accelerate's hook gives it (a module dispatched with a
    ``device_map``, its weights maybe offloaded to CPU or disk), the device a model built empty will be filled on
    (``EMPTY_ON``), else the device of its first weight not on the meta device.

    Raises:
        ValueError: every weight is on the meta device and no hook brings them anywhere (``name`` says which).
    """
    for part in module.modules():
        hook = getattr(part, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
        if getattr(part, EMPTY_ON, None) is not None:  # io.bases.load_base(empty=True); filled when it is sharded
            return torch.device(getattr(part, EMPTY_ON))
        for tensor in (*part.parameters(recurse=False), *part.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    raise ValueError(f"{name} has no weights on any device (all on 'meta', with no offload hook): load the model "
                     "with a device_map that places every block (a device, 'cpu' or 'disk'), or load it fully")


def offloaded_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights accelerate offloaded (to CPU or disk: on the meta device in the model), read from their hooks'
    weight maps, by state-dict name."""
    found = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None or not getattr(hook, "offload", False):
            continue
        for local, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if tensor.device.type == "meta":
                found[f"{prefix}.{local}" if prefix else local] = weights[local]
    return found


def weight_signature(model: nn.Module, count: int = 16) -> list[float]:
    """A few fixed entries of the input embedding matrix: tells two checkpoints of one architecture apart."""
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight.detach()
    if weight.device.type == "meta":  # offloaded: read through accelerate's hook
        execution_device(embeddings, "the input embeddings")  # refuses embeddings that are nowhere
        weight = embeddings._hf_hook.weights_map["weight"]
    flat = weight.reshape(-1)
    step = max(1, flat.numel() // count)
    picks = flat[::step][:count]
    return [round(float(x), 6) for x in picks.float().cpu()]


def weights_digest(model: nn.Module, per_tensor: int = 4096) -> str:
    """A sha256 over every tensor of the model (parameters and buffers): its name, shape and ``per_tensor`` evenly
    spaced entries rounded to bfloat16 (so a float32 copy and a bfloat16 copy of one model agree).

    Changing any tensor of a model, or most of its entries, changes the digest; it reads a few thousand entries per
    tensor, not the whole model. Weights accelerate offloaded to CPU or disk are read through its hooks; a tensor
    on the meta device with no hook counts by name and shape only.
    """
    digest = hashlib.sha256()
    offloaded = offloaded_tensors(model)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        tensor = offloaded.get(name, tensor)
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
        sample = sample.to(torch.bfloat16).view(torch.int16) if sample.is_floating_point() else sample.to(torch.int64)
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model for a saved composition: structure, origin, an embedding sample and a digest
    of every tensor."""
    config = text_config(model)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "hidden_size": hidden_size(model),
        "num_layers": num_layers(model),
        "vocab_size": vocab_size(model),
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "weight_signature": weight_signature(model),
        "weights_digest": weights_digest(model),
    }

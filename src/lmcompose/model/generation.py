"""What ``ComposedModel.generate`` adds to transformers' ``generate`` (argument checks, seeding), and the reference
decoding without any cache that cached decoding must equal.

transformers' ``generate`` does all the decoding; each forward advances one
:class:`~lmcompose.model.decoding_cache.ComposedCache` (anchor cache, augment caches, composition caches).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch


AUGMENT_INPUTS = ("augment_input_ids", "augment_attention_mask", "augment_limits")  # what model.tokenize() adds


def checked_generate_arguments(model: Any, inputs: Optional[torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of transformers' ``generate`` for a composition, checked where they enter.

    Refuses ``inputs_embeds`` (the augments read token ids) and prompts that are all padding; gives
    ``stop_strings`` the anchor's tokenizer; drops the augment inputs :meth:`ComposedModel.tokenize` returns
    (decoding re-tokenizes the text as it grows).
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in AUGMENT_INPUTS}
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds cannot drive a composition: the augments read token ids; pass input_ids")
    if inputs is not None:
        if kwargs.get("input_ids") is not None:
            raise ValueError("Pass the prompt ids once: as the first argument or as input_ids=")
        kwargs["input_ids"] = inputs
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError("generate() needs the prompt ids: generate(input_ids, attention_mask=...)")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {getattr(ids, 'shape', type(ids))}")
    mask = kwargs.get("attention_mask")
    if mask is not None and bool((mask.sum(-1) == 0).any()):
        raise ValueError("A prompt in the batch is all padding; give every prompt at least one token")
    if kwargs.get("stop_strings") and kwargs.get("tokenizer") is None:
        if model.tokenizer is None:
            raise ValueError("stop_strings needs the anchor's tokenizer: pass tokenizer=")
        kwargs["tokenizer"] = model.tokenizer
    return kwargs


@contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Inside, torch's generators start from ``seed`` (and are restored after); nothing changes for None."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def greedy_full_recompute(
    model: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32
) -> torch.Tensor:
    """Greedy decoding by a fresh forward over the whole sequence for every token (no cache).

    The reference that cached :func:`generate` must equal, and the cost the public CALM code pays.

    Args:
        input_ids: (b, t); attention_mask: (b, t) or None.
    Returns:
        (b, t + max_new_tokens) ids (no early stop at EOS).
    """
    from ..core.alignment import align_batch

    sequences = input_ids
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    own_tokenizer = any(not model.shares_tokenizer(a) for a in range(len(model.augments)))
    for _ in range(max_new_tokens):
        if own_tokenizer:  # re-tokenize the decoded text for every augment, from scratch
            rows = [row[m.bool()].tolist() for row, m in zip(sequences, mask)]
            batch = align_batch(rows, model.tokenizer, model.augment_tokenizers, padding_side="left")
            batch = {k: v.to(sequences.device) if isinstance(v, torch.Tensor) else
                     [x.to(sequences.device) if x is not None else None for x in v] for k, v in batch.items()}
            logits = model(**batch).logits[:, -1]  # (b, V)
        else:
            logits = model(sequences, attention_mask=mask).logits[:, -1]  # (b, V)
        next_tokens = logits.argmax(dim=-1, keepdim=True)  # (b, 1)
        sequences = torch.cat([sequences, next_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    return sequences

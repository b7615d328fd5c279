"""A composed forward over a :class:`~lmcompose.model.decoding_cache.ComposedCache`: every model advances by the new
tokens only.

Augments that share the anchor's tokenizer run on the new tokens and append their projected keys and values.
An augment with its own tokenizer re-tokenizes each sequence's text (see :mod:`lmcompose.model.retokenized`); when
that changes what an earlier anchor position may read (its last augment token merged with new text), the anchor
runs again from that position, so the result equals a full forward over the whole text.

Legend: b batch, n new tokens, T positions in all (past + new), S augment positions.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core import introspect
from ..core.masking import cross_mask, positions_from_mask, slot_mask
from .decoding_cache import ComposedCache


def cached_forward(model: Any, cache: ComposedCache, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   position_ids: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                   kwargs: dict[str, Any]) -> Any:
    """Advance every part of ``cache`` by ``input_ids`` (b, n) and return the anchor's output for those tokens.

    Args:
        model: the ComposedModel.
        attention_mask: (b, T) over past and new tokens; None: no padding.
        position_ids: (b, n) positions of the new tokens; None: from ``attention_mask``.
        kwargs: the anchor's other forward arguments.
    """
    b, n = input_ids.shape
    past = cache.get_seq_length()
    enabled = model.composition_enabled
    if enabled and not cache.in_step():
        raise ValueError("This cache was filled with the composition disabled (only the anchor advanced); start a "
                         "new cache")
    total = past + n
    if attention_mask is None:
        attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
    if attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; the cache holds {past} and {n} "
                         "are new: pass the mask of past and new tokens")
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)[:, -n:]  # (b, n)
    cache.record(input_ids)
    cache_argument = {introspect.cache_argument(model.anchor): cache.anchor, "use_cache": True}
    if not enabled:
        output = model.anchor(input_ids=input_ids, labels=labels, **kwargs, **cache_argument,
                              **introspect.forward_kwargs(model.anchor, attention_mask, position_ids))
        output.cache = cache
        return output

    start = past  # the first anchor position to run
    for a, composition in enumerate(cache.compositions):
        if composition is not None:
            states = model.augment_hidden(a, input_ids, attention_mask, position_ids, cache=cache.augments[a])
            composition.append(model.project(a, states, position_ids), attention_mask[:, -n:])
    for retokenized in cache.retokenized:
        if retokenized is not None:
            start = min(start, retokenized.advance(model, cache.token_ids, attention_mask))
    if start < past:
        if labels is not None:
            raise ValueError("labels with a cached forward that re-runs earlier positions: score without a cache")
        introspect.crop_cache(cache.anchor, start)
        position_ids = torch.cat([positions_from_mask(attention_mask)[:, start:past], position_ids], dim=1)
    key_values, masks = [], []
    for a, composition in enumerate(cache.compositions):
        if composition is not None:
            valid = composition.key_valid[:, :total]  # (b, T): False on padding
            key_values.append(composition.key_values())
            if start == 0 and bool(valid.all()):
                masks.append(None)  # everything runs, nothing is padding: plain causal
            else:  # position i reads the augment positions up to its own that are not padding
                limit = torch.arange(start + 1, total + 1, device=input_ids.device)[None].expand(b, total - start)
                masks.append(cross_mask(limit, valid, total))
        else:  # the augment's slots: each holds one of the row's tokens, or nothing (-1)
            retokenized = cache.retokenized[a]
            key_values.append(retokenized.key_values())  # per connection (b, h, S, d)
            masks.append(slot_mask(retokenized.limits(start, total, input_ids.device), retokenized.key_token))
    with model.attach(key_values, masks, position_ids):
        output = model.anchor(input_ids=cache.token_ids[:, start:], labels=labels, **kwargs, **cache_argument,
                              **introspect.forward_kwargs(model.anchor, attention_mask, position_ids))
    if output.logits.shape[1] > n:
        output.logits = output.logits[:, -n:]  # the positions run again are not the caller's
    output.cache = cache
    return output

"""Positions and cross-attention masks: which augment tokens each anchor token may read."""

from __future__ import annotations

from typing import Optional

import torch


def positions_from_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Position ids that skip padding, so a left-padded sequence gets the positions it has unpadded.

    Args:
        attention_mask: (b, n) 1 for tokens, 0 for padding; None -> None (the model's default arange).
    Returns:
        (b, n) long, 0 on padding.
    """
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cross_mask(
    query_limit: torch.Tensor, key_valid: Optional[torch.Tensor], num_keys: int
) -> torch.Tensor:
    """The boolean cross-attention mask from how many keys each query may read.

    Args:
        query_limit: (b, t) long: query t may read keys with index < query_limit[b, t] (keys are in
            sequence order, so what a query may read is always a prefix).
        key_valid: (b, s) bool or 0/1, False on augment padding; None when there is none.
        num_keys: s.
    Returns:
        (b, 1, t, s) bool, True where query t may attend to key s.
    """
    keys = torch.arange(num_keys, device=query_limit.device)  # (s,)
    mask = keys[None, None, :] < query_limit[:, :, None]  # (b, t, s)
    if key_valid is not None:
        mask = mask & key_valid.bool()[:, None, :]
    return mask[:, None]  # (b, 1, t, s)


def slot_mask(query_limit: torch.Tensor, key_token: torch.Tensor) -> torch.Tensor:
    """:func:`cross_mask` for keys kept in slots out of sequence order: slot s holds the key of token
    ``key_token[b, s]`` (-1: an empty or discarded slot).

    Args:
        query_limit: (b, t) long: query t may read the keys of tokens < query_limit[b, t].
        key_token: (b, s) long.
    Returns:
        (b, 1, t, s) bool.
    """
    tokens = key_token[:, None, :]  # (b, 1, s)
    return ((tokens >= 0) & (tokens < query_limit[:, :, None]))[:, None]


def same_position_limit(batch: int, num_queries: int, offset: int, device: torch.device) -> torch.Tensor:
    """Shared tokenizer: the query at index ``offset + t`` may read keys ``0 .. offset + t``.

    Returns:
        (b, t) long.
    """
    limit = torch.arange(offset + 1, offset + num_queries + 1, device=device)
    return limit[None, :].expand(batch, num_queries)

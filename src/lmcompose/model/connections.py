"""Building the connections of a composition from the two models' structure, and the checks they need."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..core import introspect
from ..core.config import CompositionConfig
from ..core.cross_attention import CrossAttention


def build_connection(anchor: nn.Module, augment: nn.Module, config: CompositionConfig) -> CrossAttention:
    """One connection from ``augment`` into ``anchor``: widths, heads and norms read from the two models.

    Args:
        anchor: the anchor LM (its width, heads and norm kind shape the cross-attention).
        augment: the augmenting LM (its width and norm kind shape f_proj's input).
        config: the composition config (num_heads, norm, rotary, proj_bias, null_attention).
    """
    heads = config.num_heads or introspect.num_attention_heads(anchor)
    anchor_dim = introspect.hidden_size(anchor)
    if anchor_dim % heads:
        raise ValueError(
            f"num_heads={heads} does not divide the anchor's hidden size {anchor_dim}; "
            "choose num_heads among its divisors"
        )
    auto = config.norm == "auto"
    return CrossAttention(
        augment_dim=introspect.hidden_size(augment),
        anchor_dim=anchor_dim,
        num_heads=heads,
        augment_norm=introspect.norm_kind(augment) if auto else config.norm,
        anchor_norm=introspect.norm_kind(anchor) if auto else config.norm,
        augment_eps=introspect.norm_eps(augment),
        anchor_eps=introspect.norm_eps(anchor),
        rotary=config.rotary,
        proj_bias=config.proj_bias,
        null_attention=config.null_attention,
        null_score=config.null_score,
    )


def check_vocabularies(anchor: nn.Module, augments: Sequence[nn.Module], augment_tokenizers: Sequence[Optional[Any]]) -> None:
    """Refuse an augment that reads the anchor's ids (no tokenizer of its own) but has another vocabulary size."""
    anchor_vocab = introspect.vocab_size(anchor)
    for a, model in enumerate(augments):
        if augment_tokenizers[a] is not None:
            continue  # different tokenizers: texts are aligned by character offsets
        vocab = introspect.vocab_size(model)
        if vocab != anchor_vocab:
            raise ValueError(
                f"The anchor's vocabulary has {anchor_vocab} tokens but {augment_name(a, len(augments))}'s "
                f"has {vocab}: the models do not share a tokenizer. Pass tokenizer= and augment_tokenizer= "
                "so each model reads its own tokens of the same text."
            )


def augment_name(a: int, count: int) -> str:
    """How messages name augment ``a`` of ``count``."""
    return "the augment model" if count == 1 else f"augment model {a}"


def place_connections(connections: nn.ModuleList, resolved: Sequence[Sequence[tuple[int, int]]],
                      anchor_blocks: Sequence[nn.Module], dtype: torch.dtype) -> None:
    """Put each connection where the anchor block it attaches to computes (its execution device under a
    ``device_map``, offloaded weights included), in ``dtype``.

    Args:
        connections: per augment, its connections.
        resolved: per augment, its (augment layer, anchor layer) pairs; anchor layer -1 is the first block's input.
        anchor_blocks: the anchor's decoder blocks.
    """
    for per_augment, pairs in zip(connections, resolved):
        for connection, (_, j) in zip(per_augment, pairs):
            block = max(j, 0)
            device = introspect.execution_device(anchor_blocks[block], f"anchor block {block}")
            connection.to(device=device, dtype=dtype)


def on_device_of(connection: nn.Module, states: torch.Tensor,
                 positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """An augment's states (and positions) moved to where ``connection`` is (the device of its anchor block)."""
    device = next(connection.parameters()).device
    if states.device == device:
        return states, positions
    return states.to(device), None if positions is None else positions.to(device)

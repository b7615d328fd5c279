"""The anchor's blocks below its lowest connection, computed once and replayed.

No connection changes what the anchor's blocks ``0 .. j`` compute when ``j`` is its lowest connected layer (a
connection adds its update to block ``j``'s output), and the anchor is frozen: their output on a text is the same at
every step. :func:`compute_prefix` computes it for a batch (:func:`forward_with_prefix` keeps it from the anchor's
own whole forward); a forward given an :class:`AnchorPrefix` (of the whole batch) replays it instead of running
those blocks, the update at block ``j`` and every block above run as usual.

Legend: b batch, t positions, D the anchor's width.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..core import introspect
from ..core.masking import positions_from_mask
from .hooks import _StopForward, forwards_wrapped


@dataclass(frozen=True)
class AnchorPrefix:
    """The anchor's output of block ``layer`` on a batch, and the form in which its blocks return it.

    Attributes:
        states: (b, t, D) block ``layer``'s output (its hidden states; anything at padding).
        layer: the anchor block whose output ``states`` is; blocks ``0 .. layer`` are replayed.
        arity: None when the anchor's blocks return a tensor, else the length of the tuple they return (the
            hidden states first; the rest, attention weights or caches no composition asks for, as None).
    """

    states: torch.Tensor
    layer: int
    arity: Optional[int] = None


def prefix_layer(resolved_connections: Sequence[Sequence[tuple[int, int]]]) -> int:
    """The lowest anchor layer any connection adds to (-1: the embeddings, so there is no prefix to replay)."""
    return min(j for pairs in resolved_connections for _, j in pairs)


def check_prefix_anchor(anchor: nn.Module, layer: int) -> None:
    """Refuse an anchor whose prefix cannot be replayed: no block below its lowest connection, or blocks that
    accelerate moves between devices (a ``device_map``; their hooks expect the blocks to run)."""
    if layer < 0:
        raise ValueError("There is no anchor prefix to reuse: a connection adds to the anchor's embeddings (anchor "
                         "layer -1), so every anchor block is below a connection. Connect higher blocks only, or "
                         "turn the anchor-state cache off")
    if getattr(anchor, "hf_device_map", None) or any(getattr(b, "_hf_hook", None) is not None
                                                     for b in introspect.decoder_blocks(anchor)[: layer + 1]):
        raise ValueError("The anchor-state cache needs the anchor's lower blocks on one device (this anchor was "
                         "loaded with a device_map); load it without one, or turn the cache off")


@torch.no_grad()
def compute_prefix(anchor: nn.Module, layer: int, input_ids: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> AnchorPrefix:
    """Run the anchor alone up to block ``layer`` and return that block's output.

    Args:
        input_ids: (b, t) anchor ids.
        attention_mask: (b, t) 1 for tokens, 0 for padding; positions skip padding, as a composed forward's do.
    """
    return _run_anchor(anchor, layer, input_ids, attention_mask, stop=True)[1]


@torch.no_grad()
def forward_with_prefix(anchor: nn.Module, layer: int, input_ids: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> tuple[Any, AnchorPrefix]:
    """The anchor's whole forward on a batch (no cache), and block ``layer``'s output in that same computation:
    the anchor's own logits and, for free, the prefix every composition on this anchor replays on the batch.

    Args: as :func:`compute_prefix`'s.
    Returns:
        (the anchor's output, its :class:`AnchorPrefix`).
    """
    return _run_anchor(anchor, layer, input_ids, attention_mask, stop=False)


def _run_anchor(anchor: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                stop: bool) -> tuple[Any, AnchorPrefix]:
    """The anchor's forward with block ``layer``'s output captured; ``stop``: nothing above it runs (no output)."""
    blocks = introspect.decoder_blocks(anchor)
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured["output"] = output
        if stop:
            raise _StopForward  # nothing above the prefix is needed

    kwargs = introspect.forward_kwargs(anchor, attention_mask, positions_from_mask(attention_mask))
    handle = blocks[layer].register_forward_hook(hook)
    result = None
    try:
        result = anchor(input_ids=input_ids, use_cache=False, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    output = captured["output"]
    if isinstance(output, (tuple, list)):
        return result, AnchorPrefix(output[0], layer, len(output))
    return result, AnchorPrefix(output, layer, None)


@contextmanager
def replayed_prefix(blocks: Sequence[nn.Module], prefix: AnchorPrefix) -> Iterator[None]:
    """While active, blocks ``0 .. prefix.layer`` compute nothing: each passes its input on, and the last returns
    ``prefix.states``; hooks on them (a connection's update on the last) still apply."""
    def output(hidden: torch.Tensor) -> Any:
        return hidden if prefix.arity is None else (hidden, *([None] * (prefix.arity - 1)))

    def replay(last: bool) -> Any:
        def wrap(forward: Any) -> Any:
            def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if last and hidden_states.shape[:2] != prefix.states.shape[:2]:
                    raise ValueError(f"The anchor prefix's states are {tuple(prefix.states.shape)}, but the batch is "
                                     f"{tuple(hidden_states.shape[:2])}: compute them on the same batch")
                return output(prefix.states.to(hidden_states.dtype) if last else hidden_states)

            return run

        return wrap

    with forwards_wrapped(blocks[: prefix.layer], replay(False)), forwards_wrapped([blocks[prefix.layer]],
                                                                                    replay(True)):
        yield

"""Forward hooks on decoder blocks, each registered and removed in one place: capture block outputs, add updates.

Legend: b batch, t positions, D width of the residual stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..core.config import EMBEDDINGS

Update = Callable[[torch.Tensor], torch.Tensor]  # hidden states (b, t, D) -> the residual update to add (b, t, D)


class _StopForward(Exception):
    """Raised by a capture hook once the highest wanted block has run."""


def capture_outputs(blocks: Sequence[nn.Module], layers: Sequence[int], run: Callable[[], Any]) -> dict[int, torch.Tensor]:
    """Call ``run()`` (a forward of the model that owns ``blocks``) and capture the outputs of ``blocks[i]``.

    The forward stops right after the highest of ``layers``: nothing above it is computed.

    Args:
        blocks: the model's decoder blocks.
        layers: indices of the blocks whose outputs are wanted.
        run: runs the model's forward.
    Returns:
        {layer: (b, t, D)} for every index of ``layers``.
    """
    layers = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, (tuple, list)) else output
            if layer == layers[-1]:
                raise _StopForward  # nothing above the last wanted block is needed

        return hook

    handles = [blocks[i].register_forward_hook(capture(i)) for i in layers]
    try:
        run()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in layers if i not in captured]
    if missing:
        raise RuntimeError(f"Blocks {missing} did not run; is the model a decoder-only LM?")
    return captured


@contextmanager
def residual_updates(blocks: Sequence[nn.Module], updates: dict[int, Update]) -> Iterator[None]:
    """While active, block ``j``'s output gets ``updates[j](output)`` added; for ``j == -1`` (the embeddings) the
    first block's input gets ``updates[-1](input)`` added, as that block receives it.

    Args:
        blocks: the model's decoder blocks.
        updates: {layer: function of the hidden states (b, t, D) giving the update (b, t, D)}.
    """

    def updated(hidden: torch.Tensor, update: Update) -> torch.Tensor:
        return hidden + update(hidden).to(hidden.dtype)

    def after_block(update: Update) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, (tuple, list)):  # a block may return a tensor or a tuple
                return type(output)((updated(output[0], update), *output[1:]))
            return updated(output, update)

        return hook

    def before_first_block(update: Update) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: dict) -> Any:
            if args:
                return (updated(args[0], update), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": updated(kwargs["hidden_states"], update)}

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(before_first_block(update), with_kwargs=True)
        if j == EMBEDDINGS
        else blocks[j].register_forward_hook(after_block(update))
        for j, update in updates.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def forwards_wrapped(modules: Sequence[nn.Module], wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """While active, each module's ``forward`` is ``wrap(forward)``; afterwards it is what it was, a forward set on
    the instance (e.g. by accelerate) included."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = wrap(module.forward)
    try:
        yield
    finally:
        for module, forward in zip(modules, saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@contextmanager
def checkpointed_blocks(blocks: Sequence[nn.Module], checkpoint_kwargs: dict[str, Any]) -> Iterator[None]:
    """While active, each block's forward runs under ``torch.utils.checkpoint``: its activations are recomputed in
    the backward pass instead of kept. Forward hooks (the residual updates) stay outside the recomputation.

    Args:
        blocks: the decoder blocks.
        checkpoint_kwargs: passed to ``torch.utils.checkpoint.checkpoint`` (e.g. ``use_reentrant=False``).
    """
    def checkpointed(forward: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(forward, *args, **checkpoint_kwargs, **kwargs)

        return run

    with forwards_wrapped(blocks, checkpointed):
        yield


@contextmanager
def head_at(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, the LM head ``head`` computes its output only at the positions where ``keep`` is True and gives
    zeros elsewhere: a training step that scores a few positions of each row does not pay the vocabulary-wide matmul
    (forward and backward) at the others. A head called on other shapes (``logits_to_keep``) runs as usual.

    Args:
        head: the anchor's output embeddings (hidden states (b, t, D) -> logits (b, t, V)).
        keep: (b, t) bool, the positions whose logits are read.
    """
    def sparse(forward: Callable) -> Callable:
        def run(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[:2] != keep.shape:
                return forward(hidden)
            kept = forward(hidden[keep])  # (n, V)
            logits = kept.new_zeros(*keep.shape, kept.shape[-1])  # (b, t, V)
            logits[keep] = kept
            return logits

        return run

    with forwards_wrapped([head], sparse):
        yield

"""Incremental decoding over both models' caches: greedy, sampling, batching, streaming.

Each step runs every augment on the new token with its own KV cache, appends the projected keys and
values of every connection to a :class:`CompositionCache`, then runs the anchor step with its own KV
cache while its cross-attention reads the composition cache. Nothing is recomputed over the sequence.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import introspect
from .masking import cross_mask, positions_from_mask


class CompositionCache:
    """Projected augment keys and values of every connection, preallocated for the whole generation.

    Args:
        batch: b.
        capacity: the most positions it will hold (prompt + new tokens).
    """

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch = batch
        self.capacity = capacity
        self.length = 0
        self._keys: list[list[torch.Tensor]] = []  # per augment, per connection: (b, h, capacity, d)
        self._values: list[list[torch.Tensor]] = []
        self.key_valid = None  # (b, capacity) bool, False on augment padding

    def append(self, key_values: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], valid: torch.Tensor) -> None:
        """Add s new positions: per augment, per connection, (keys, values) each (b, h, s, d); valid (b, s)."""
        s = valid.shape[1]
        if self.length + s > self.capacity:
            raise ValueError(f"CompositionCache holds {self.capacity} positions; cannot add {s} more")
        if not self._keys:
            for pairs in key_values:
                self._keys.append([k.new_empty(*k.shape[:2], self.capacity, k.shape[3]) for k, _ in pairs])
                self._values.append([v.new_empty(*v.shape[:2], self.capacity, v.shape[3]) for _, v in pairs])
            self.key_valid = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=valid.device)
        end = self.length + s
        for a, pairs in enumerate(key_values):
            for c, (k, v) in enumerate(pairs):
                self._keys[a][c][:, :, self.length : end] = k
                self._values[a][c][:, :, self.length : end] = v
        self.key_valid[:, self.length : end] = valid.bool()
        self.length = end

    def key_values(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Views of what is filled: per augment, per connection, (keys, values) each (b, h, length, d)."""
        n = self.length
        return [
            [(k[:, :, :n], v[:, :, :n]) for k, v in zip(keys, values)]
            for keys, values in zip(self._keys, self._values)
        ]


def _logits_processors(
    do_sample: bool,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    repetition_penalty: Optional[float],
) -> Any:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _eos_ids(model: nn.Module, eos_token_id: Union[None, int, Sequence[int]]) -> list[int]:
    if eos_token_id is None:
        generation_config = getattr(model, "generation_config", None)
        eos_token_id = getattr(generation_config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: Optional[float] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    stop_strings: Union[None, str, Sequence[str]] = None,
    tokenizer: Any = None,
    streamer: Any = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Generate with a :class:`~lmcompose.ComposedModel`, one incremental step per new token.

    Args:
        model: the composed model (inside ``disable_composition()`` this decodes the anchor alone).
        input_ids: (b, t) prompt ids; left-pad prompts of different lengths.
        attention_mask: (b, t), 0 on padding; None when nothing is padded.
        max_new_tokens: the most tokens added to each sequence.
        do_sample: sample instead of greedy argmax.
        temperature, top_k, top_p: sampling warpers (transformers' logits processors).
        repetition_penalty: >1 discourages tokens already in the sequence.
        eos_token_id: id(s) that end a sequence; default: the anchor's generation config.
        pad_token_id: filler after a sequence ended; default: the anchor's, else the first EOS id.
        stop_strings: text that ends a sequence (needs ``tokenizer``).
        tokenizer: the anchor's tokenizer (for ``stop_strings``); default ``model.tokenizer``.
        streamer: a transformers streamer (``put``/``end``), e.g. ``TextStreamer`` (batch 1).
        seed: seed of the sampling generator, for reproducible samples.
    Returns:
        (b, t + n) ids: the prompts followed by up to ``max_new_tokens`` new tokens, padded with
        ``pad_token_id`` after a sequence ended.
    """
    from transformers import StoppingCriteriaList, StopStringCriteria

    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    anchor = model.anchor
    device = introspect.model_device(anchor)
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device).long()
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("A prompt in the batch is all padding; give every prompt at least one token")
    eos = _eos_ids(anchor, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(anchor.config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    processors = _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
    criteria = StoppingCriteriaList()
    if stop_strings:
        tok = tokenizer if tokenizer is not None else model.tokenizer
        if tok is None:
            raise ValueError("stop_strings needs the anchor's tokenizer: pass tokenizer=")
        criteria.append(StopStringCriteria(tok, stop_strings))
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    composed = model.composition_enabled
    step = _Stepper(model, b, t + max_new_tokens, composed)
    padded = bool((attention_mask == 0).any())
    positions = positions_from_mask(attention_mask)  # (b, t)
    logits = step(input_ids, attention_mask, positions, padded)  # (b, V)

    sequences = input_ids
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        scores = processors(sequences, logits.float())
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (b,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (b,)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            unfinished &= ~torch.isin(next_tokens, torch.tensor(eos, device=device))
        if len(criteria):
            unfinished &= ~criteria(sequences, scores)
        if not unfinished.any() or sequences.shape[1] == t + max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)[:, None]], dim=1)
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = step(next_tokens[:, None], attention_mask, positions, padded)
    if streamer is not None:
        streamer.end()
    return sequences


class _Stepper:
    """Advances the augments, the composition cache and the anchor by the given new tokens.

    Holds the three kinds of cache for one call of :func:`generate`; nothing outlives that call.
    """

    def __init__(self, model: Any, batch: int, capacity: int, composed: bool) -> None:
        self.model = model
        self.composed = composed
        self.anchor_cache = introspect.new_cache(model.anchor)
        self.anchor_cache_arg = introspect.cache_argument(model.anchor)
        self.logits_to_keep = introspect.accepts(model.anchor, "logits_to_keep")
        self.anchor_positions = introspect.accepts(model.anchor, "position_ids")
        if composed:
            for a in range(len(model.augments)):
                if not model.shares_tokenizer(a):
                    raise NotImplementedError(
                        "generate() with an augment of another tokenizer goes through model.generate(**model.tokenize(...))"
                    )
            self.augment_caches = [introspect.new_cache(m) for m in model.augments]
            self.composition = CompositionCache(batch, capacity)

    def __call__(
        self, new_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, padded: bool
    ) -> torch.Tensor:
        """Run new_ids (b, n) at positions (b, n); attention_mask (b, past + n). Returns last logits (b, V)."""
        model = self.model
        kwargs: dict[str, Any] = {
            "attention_mask": attention_mask,
            self.anchor_cache_arg: self.anchor_cache,
            "use_cache": True,
        }
        if self.anchor_positions:
            kwargs["position_ids"] = positions
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if not self.composed:
            return model.anchor(input_ids=new_ids, **kwargs).logits[:, -1]
        b, n = new_ids.shape
        new_kv = []
        for a in range(len(model.augments)):
            states = model.augment_hidden(a, new_ids, attention_mask, positions, cache=self.augment_caches[a])
            new_kv.append(model.project(a, states, positions))
        self.composition.append(new_kv, attention_mask[:, -n:])
        total = self.composition.length
        if padded:
            # query i (at index total - n + i) reads keys up to its own index that are not padding
            limit = torch.arange(total - n + 1, total + 1, device=new_ids.device)[None].expand(b, n)
            mask = cross_mask(limit, self.composition.key_valid[:, :total], total)
        elif n == total:
            mask = None  # prefill without padding: plain causal
        else:
            mask = torch.ones(b, 1, n, total, dtype=torch.bool, device=new_ids.device).tril(total - n)
        masks = [mask] * len(model.augments)
        with model.attach(self.composition.key_values(), masks, positions):
            return model.anchor(input_ids=new_ids, **kwargs).logits[:, -1]


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
    sequences = input_ids
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    for _ in range(max_new_tokens):
        logits = model(sequences, attention_mask=mask).logits[:, -1]  # (b, V)
        next_tokens = logits.argmax(dim=-1, keepdim=True)  # (b, 1)
        sequences = torch.cat([sequences, next_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    return sequences

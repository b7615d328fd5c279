"""Incremental decoding over both models' caches: greedy, sampling, batching, streaming.

Each step runs every augment on the new token with its own KV cache, appends the projected keys and
values of every connection to a :class:`CompositionCache`, then runs the anchor step with its own KV
cache while its cross-attention reads the composition cache. Nothing is recomputed over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core import introspect
from ..core.masking import cross_mask, positions_from_mask
from ..core.padding import pad_rows
from .decoding_cache import CompositionCache


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
    augment_input_ids: Any = None,
    augment_attention_mask: Any = None,
    augment_limits: Any = None,
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
        augment_input_ids, augment_attention_mask, augment_limits: accepted so that
            ``generate(**model.tokenize(prompts, padding_side="left"))`` works; an augment with its own
            tokenizer re-tokenizes the decoded text at every step, so these are recomputed.
    Returns:
        (b, t + n) ids: the prompts followed by up to ``max_new_tokens`` new tokens, padded with
        ``pad_token_id`` after a sequence ended.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    anchor = model.anchor
    device = introspect.model_device(anchor)
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device).long()
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("A prompt in the batch is all padding; give every prompt at least one token")
    eos = _eos_ids(anchor, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(anchor.config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
    composed = model.composition_enabled
    own_tokenizer = composed and any(not model.shares_tokenizer(a) for a in range(len(model.augments)))
    if own_tokenizer and input_ids.shape[0] > 1:
        if streamer is not None:
            raise ValueError("A streamer takes one prompt at a time; pass a batch of one")
        return _one_prompt_at_a_time(model, input_ids, attention_mask, max_new_tokens, sampling, eos, pad_token_id,
                                     stop_strings, tokenizer, seed)
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None
    decoding = _Decoding(processors=_logits_processors(**sampling), criteria=_stopping(model, stop_strings, tokenizer),
                         do_sample=do_sample, generator=generator, eos=eos, pad_token_id=pad_token_id)
    if own_tokenizer:
        input_ids = input_ids[:, attention_mask[0].bool()]
        attention_mask = torch.ones_like(input_ids)
        step: Any = _RetokenizingStepper(model, input_ids.shape[1] + max_new_tokens)
    else:
        step = _Stepper(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, composed)
    return _decode(step, input_ids, attention_mask, max_new_tokens, decoding, streamer)


@dataclass
class _Decoding:
    """How each next token is chosen and when a sequence ends (for one call of :func:`generate`)."""

    processors: Any  # a transformers LogitsProcessorList
    criteria: Any  # a transformers StoppingCriteriaList
    do_sample: bool
    generator: Optional[torch.Generator]
    eos: list[int]
    pad_token_id: int


def _stopping(model: Any, stop_strings: Union[None, str, Sequence[str]], tokenizer: Any) -> Any:
    """transformers' stopping criteria for ``stop_strings`` (empty without them)."""
    from transformers import StoppingCriteriaList, StopStringCriteria

    criteria = StoppingCriteriaList()
    if stop_strings:
        tok = tokenizer if tokenizer is not None else model.tokenizer
        if tok is None:
            raise ValueError("stop_strings needs the anchor's tokenizer: pass tokenizer=")
        criteria.append(StopStringCriteria(tok, stop_strings))
    return criteria


def _decode(step: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            decoding: _Decoding, streamer: Any) -> torch.Tensor:
    """The decoding loop: prefill through ``step``, then one token at a time until EOS, a stop or the limit.

    Args:
        step: a stepper: (sequences, attention_mask, positions, n new) -> last logits (b, V).
        input_ids, attention_mask: (b, t) prompts.
    Returns:
        (b, t + n) ids.
    """
    b, t = input_ids.shape
    positions = positions_from_mask(attention_mask)  # (b, t)
    logits = step(input_ids, attention_mask, positions, t)  # (b, V)
    sequences = input_ids
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        scores = decoding.processors(sequences, logits.float())
        if decoding.do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=decoding.generator).squeeze(1)  # (b,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (b,)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, decoding.pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if decoding.eos:
            unfinished &= ~torch.isin(next_tokens, torch.tensor(decoding.eos, device=next_tokens.device))
        if len(decoding.criteria):
            unfinished &= ~decoding.criteria(sequences, scores)
        if not unfinished.any() or sequences.shape[1] == t + max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)[:, None]], dim=1)
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = step(sequences, attention_mask, positions, 1)
    if streamer is not None:
        streamer.end()
    return sequences


def _one_prompt_at_a_time(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                          sampling: dict[str, Any], eos: list[int], pad_token_id: int, stop_strings: Any,
                          tokenizer: Any, seed: Optional[int]) -> torch.Tensor:
    """A batch decoded prompt by prompt (an augment with its own tokenizer re-tokenizes each text on its own)."""
    rows = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        rows.append(generate(
            model, input_ids[row : row + 1, keep], max_new_tokens=max_new_tokens, **sampling, eos_token_id=eos,
            pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
            seed=None if seed is None else seed + row,
        )[0, int(keep.sum()):])
    new, _ = pad_rows(rows, pad_token_id)  # (b, n): each row's new tokens, padded after its end
    return torch.cat([input_ids, new.to(input_ids)], dim=1)


class _Stepper:
    """Advances the augments, the composition cache and the anchor by the given new tokens.

    Holds the three kinds of cache for one call of :func:`generate`; nothing outlives that call.
    """

    def __init__(self, model: Any, batch: int, capacity: int, composed: bool) -> None:
        self.model = model
        self.composed = composed
        self.padded: Optional[bool] = None
        self.anchor_cache = introspect.new_cache(model.anchor)
        self.anchor_cache_arg = introspect.cache_argument(model.anchor)
        self.logits_to_keep = introspect.accepts(model.anchor, "logits_to_keep")
        self.anchor_positions = introspect.accepts(model.anchor, "position_ids")
        if composed:
            self.augment_caches = [introspect.new_cache(m) for m in model.augments]
            self.compositions = [CompositionCache(batch, capacity) for _ in model.augments]

    def __call__(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Run the last n tokens of sequences (b, past + n) at positions (b, n). Returns last logits (b, V)."""
        model = self.model
        new_ids = sequences[:, -n:]
        if self.padded is None:
            self.padded = bool((attention_mask == 0).any())
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
        b = new_ids.shape[0]
        for a, composition in enumerate(self.compositions):
            states = model.augment_hidden(a, new_ids, attention_mask, positions, cache=self.augment_caches[a])
            composition.append(model.project(a, states, positions), attention_mask[:, -n:])
        total = self.compositions[0].length
        if self.padded:
            # query i (at index total - n + i) reads keys up to its own index that are not padding
            limit = torch.arange(total - n + 1, total + 1, device=new_ids.device)[None].expand(b, n)
            mask = cross_mask(limit, self.compositions[0].key_valid[:, :total], total)
        elif n == total:
            mask = None  # prefill without padding: plain causal
        else:
            mask = torch.ones(b, 1, n, total, dtype=torch.bool, device=new_ids.device).tril(total - n)
        masks = [mask] * len(model.augments)
        with model.attach([c.key_values() for c in self.compositions], masks, positions):
            return model.anchor(input_ids=new_ids, **kwargs).logits[:, -1]


class _RetokenizingStepper:
    """Decoding when an augment has its own tokenizer (one sequence, no padding).

    After each new anchor token the text is decoded and re-tokenized for every such augment; its KV
    cache and composition cache are cropped to the longest unchanged prefix of its tokens and only the
    changed tail is run. Anchor positions whose visible augment tokens changed are re-run too (usually
    none or the last one), so the result equals a full recompute over the decoded text.
    """

    def __init__(self, model: Any, capacity: int) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.anchor_cache = introspect.new_cache(model.anchor)
        self.anchor_cache_arg = introspect.cache_argument(model.anchor)
        self.anchor_ends: list[int] = []
        self.anchor_done = 0  # anchor positions in the anchor cache
        count = len(model.augments)
        self.augment_caches = [introspect.new_cache(m) for m in model.augments]
        self.compositions = [CompositionCache(1, capacity) for _ in range(count)]
        self.augment_ids: list[list[int]] = [[] for _ in range(count)]
        self.limits: list[list[int]] = [[] for _ in range(count)]

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
        """Advance to ``sequences`` (1, total); returns the last position's logits (1, V)."""
        from ..core.alignment import anchor_token_ends, anchor_trailing_specials, augment_tokens, settled_limits

        model = self.model
        device = sequences.device
        ids = sequences[0].tolist()
        # ends of earlier tokens stay, except trailing special tokens, whose end moves with the text
        known = self.anchor_ends[: len(ids) - 1]
        trailing = anchor_trailing_specials(self.tokenizer, ids[: len(known)])
        known = known[: next((k for k, t in enumerate(trailing) if t), len(known))]
        text, ends = anchor_token_ends(self.tokenizer, ids, known=known)
        self.anchor_ends = ends
        rerun_from = len(ids) - 1  # the newest anchor position always runs
        for a, augment_tokenizer in enumerate(model.augment_tokenizers):
            if augment_tokenizer is None:
                new_ids, limits = ids, list(range(1, len(ids) + 1))
            else:
                new_ids, _ = augment_tokens(augment_tokenizer, text)
                if not new_ids:
                    raise ValueError("The augment's tokenizer gives no token for this text; give a longer prompt")
                trailing = anchor_trailing_specials(self.tokenizer, ids)
                limits = settled_limits(augment_tokenizer, text, ends, new_ids, trailing)
            old_ids = self.augment_ids[a]
            keep = 0
            while keep < min(len(old_ids), len(new_ids)) and old_ids[keep] == new_ids[keep]:
                keep += 1
            if keep < len(old_ids):
                introspect.crop_cache(self.augment_caches[a], keep)
                self.compositions[a].crop(keep)
            if keep < len(new_ids):
                tail = torch.tensor([new_ids[keep:]], device=device)
                tail_positions = torch.arange(keep, len(new_ids), device=device)[None]
                mask = torch.ones(1, len(new_ids), dtype=torch.long, device=device)
                states = model.augment_hidden(a, tail, mask, tail_positions, cache=self.augment_caches[a])
                self.compositions[a].append(model.project(a, states, tail_positions), mask[:, keep:])
            old_limits = self.limits[a]
            for k, old in enumerate(old_limits):
                if old != limits[k] or old > keep:
                    rerun_from = min(rerun_from, k)
                    break
            self.augment_ids[a], self.limits[a] = new_ids, limits
        rerun_from = min(rerun_from, self.anchor_done)
        if rerun_from < self.anchor_done:
            introspect.crop_cache(self.anchor_cache, rerun_from)
        run = torch.tensor([ids[rerun_from:]], device=device)
        run_positions = torch.arange(rerun_from, len(ids), device=device)[None]
        masks = []
        for a, composition in enumerate(self.compositions):
            limit = torch.tensor([self.limits[a][rerun_from:]], device=device)
            masks.append(cross_mask(limit, None, composition.length))
        kwargs = {
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
            "position_ids": run_positions,
            self.anchor_cache_arg: self.anchor_cache,
            "use_cache": True,
        }
        if not introspect.accepts(model.anchor, "position_ids"):
            kwargs.pop("position_ids")
        with model.attach([c.key_values() for c in self.compositions], masks, run_positions):
            logits = model.anchor(input_ids=run, **kwargs).logits[:, -1]
        self.anchor_done = len(ids)
        return logits


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

"""What ``ComposedModel.generate`` adds to transformers' ``generate``: argument checks, seeding, and decoding when an
augment has its own tokenizer (a loop of its own: the augment re-tokenizes the decoded text as it grows).

With shared tokenizers, transformers' ``generate`` does all the decoding; each forward advances one
:class:`~lmcompose.model.decoding_cache.ComposedCache` (anchor cache, augment caches, composition caches).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from ..core import introspect
from ..core.masking import cross_mask, positions_from_mask
from ..core.padding import pad_rows
from .decoding_cache import CompositionCache

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


OWN_TOKENIZER_OPTIONS = {"input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature",
                         "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "stop_strings",
                         "tokenizer", "streamer", "use_cache", "generation_config"}


@torch.no_grad()
def generate_with_own_tokenizer(model: Any, generation_config: Any = None, **kwargs: Any) -> torch.Tensor:
    """Greedy or sampled decoding when an augment has its own tokenizer, one incremental step per new token.

    Takes the options of transformers' ``generate`` that apply to one sequence per prompt (``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``,
    ``pad_token_id``, ``stop_strings``, ``streamer``), defaults from ``generation_config`` or the model's.

    Returns:
        (b, t + n) ids: the prompts followed by up to ``max_new_tokens`` new tokens, padded with
        ``pad_token_id`` after a sequence ended.
    """
    unsupported = sorted(set(kwargs) - OWN_TOKENIZER_OPTIONS)
    if unsupported:
        raise ValueError(f"generate() option(s) {', '.join(unsupported)} not supported when an augment has its own "
                         "tokenizer (it decodes one sequence per prompt, greedy or sampled)")
    input_ids = kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    streamer, tokenizer = kwargs.pop("streamer", None), kwargs.pop("tokenizer", None)
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "use_cache"})
    t = input_ids.shape[1]
    max_new_tokens = config.max_new_tokens if config.max_new_tokens is not None else max(0, config.max_length - t)
    device = introspect.model_device(model.anchor)
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(device).long()
    eos = _eos_ids(config.eos_token_id)
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = dict(do_sample=bool(config.do_sample), temperature=config.temperature, top_k=config.top_k,
                    top_p=config.top_p, repetition_penalty=config.repetition_penalty)
    if input_ids.shape[0] > 1:
        if streamer is not None:
            raise ValueError("A streamer takes one prompt at a time; pass a batch of one")
        return _one_prompt_at_a_time(model, input_ids, attention_mask, max_new_tokens, sampling, eos, pad_token_id,
                                     config.stop_strings, tokenizer)
    decoding = _Decoding(processors=_logits_processors(**sampling),
                         criteria=_stopping(model, config.stop_strings, tokenizer),
                         do_sample=sampling["do_sample"], eos=eos, pad_token_id=pad_token_id)
    input_ids = input_ids[:, attention_mask[0].bool()]
    attention_mask = torch.ones_like(input_ids)
    return _decode(_RetokenizingStepper(model, input_ids.shape[1] + max_new_tokens), input_ids, attention_mask,
                   max_new_tokens, decoding, streamer)


def _logits_processors(do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                       repetition_penalty: Optional[float]) -> Any:
    """transformers' logits processors for these options (warpers only when sampling)."""
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
        if temperature is None or temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _eos_ids(eos_token_id: Union[None, int, Sequence[int]]) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@dataclass
class _Decoding:
    """How each next token is chosen and when a sequence ends (for one call of :func:`generate`)."""

    processors: Any  # a transformers LogitsProcessorList
    criteria: Any  # a transformers StoppingCriteriaList
    do_sample: bool
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
            next_tokens = torch.multinomial(probs, 1).squeeze(1)  # (b,)
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
                          tokenizer: Any) -> torch.Tensor:
    """A batch decoded prompt by prompt (an augment with its own tokenizer re-tokenizes each text on its own)."""
    rows = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        rows.append(generate_with_own_tokenizer(
            model, input_ids=input_ids[row : row + 1, keep], max_new_tokens=max_new_tokens, **sampling,
            eos_token_id=eos or None, pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
        )[0, int(keep.sum()):])
    new, _ = pad_rows(rows, pad_token_id)  # (b, n): each row's new tokens, padded after its end
    return torch.cat([input_ids, new.to(input_ids)], dim=1)


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

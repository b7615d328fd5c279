"""Text in, text out: tokenizing prompts as training does and decoding what the model generates."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from ..core.padding import pad_rows, pad_token_id
from ..core.tokens import encode_prompt


def decode_new_tokens(tokenizer: Any, new_ids: Sequence[int]) -> str:
    """Decode generated ids up to (not including) the first EOS, without special tokens."""
    eos = tokenizer.eos_token_id
    ids = list(new_ids)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Union[int, Sequence[int]] = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of tokenized prompts, batched with left padding.

    Args:
        model: a ComposedModel (inside ``disable_composition()``: the anchor alone).
        tokenizer: the anchor's tokenizer (EOS, padding, decoding).
        prompts: one list of ids per prompt, as :func:`lmcompose.core.tokens.encode_prompt` makes them.
        max_new_tokens: the most new tokens, one number or one per prompt (a batch uses its largest).
        batch_size: prompts per generate call.
    Returns:
        one decoded completion per prompt (up to its first EOS).
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    pad_id = pad_token_id(tokenizer, model)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad_rows(chunk, pad_id, "left")  # (b, t) each
        device = model.device
        sequences = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(limits[start : start + batch_size]),
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
        )  # (b, t + n)
        for row in sequences[:, ids.shape[1] :].tolist():
            out.append(decode_new_tokens(tokenizer, row))
    return out


def complete(
    model: Any, tokenizer: Any, prompt: str, streamer: Optional[Any] = None, **generate_kwargs: Any
) -> str:
    """Complete one prompt string; the text after the prompt, up to EOS.

    Args:
        model: a ComposedModel.
        tokenizer: the anchor's tokenizer.
        prompt: the text; tokenized as training tokenizes prompts (BOS when the tokenizer adds one).
        streamer: a transformers streamer (e.g. ``TextStreamer``) that receives tokens as they come.
        **generate_kwargs: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``repetition_penalty``, ``seed``, ... as ``model.generate`` takes them.
    """
    ids = torch.as_tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=model.device)  # (1, t)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    sequences = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **generate_kwargs)
    return decode_new_tokens(tokenizer, sequences[0, ids.shape[1] :].tolist())

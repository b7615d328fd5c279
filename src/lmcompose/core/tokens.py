"""How prompts become token ids: the tokenizer's own BOS convention, the same in training and in generation."""

from __future__ import annotations

from typing import Any


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of a text by default (``add_special_tokens=True``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids as training sees them: BOS (when the tokenizer adds one by default), then the text."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + list(ids)


def same_vocabulary(anchor: Any, augment: Any) -> bool:
    """Whether an augment's tokenizer gives the anchor's ids (None or the anchor's own tokenizer: yes)."""
    if augment is None or augment is anchor:
        return True
    if anchor is None:
        return False
    try:
        return anchor.get_vocab() == augment.get_vocab()
    except (AttributeError, NotImplementedError):
        return False

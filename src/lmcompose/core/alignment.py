"""Cross-tokenizer alignment: which augment tokens each anchor token may read.

Each model tokenizes the same text; the anchor's ids are the source of truth (the text is their
decoding, which is also what generation sees). Anchor token t covers the text up to its end (a token
that carries only part of a multi-byte character ends where that character starts). It may read the
augment tokens of that text that later text cannot change: the augment's tokenization of the covered
text up to the start of its last pre-token (a word, a number, a run of spaces), because the last
pre-token may still merge with what follows ("an" + "d" -> "and"). Reading only those tokens makes the
composed model's output at t independent of everything after t, which a plain "tokens that end before
t ends" rule does not: a token's very existence there would reveal how the next characters merge.
A character-level augment (its pre-tokenizer makes every character a piece) has nothing that can
merge: anchor token t reads all the augment characters it covers.
Special tokens before the text (BOS) are always readable; the anchor's own trailing special tokens
(EOS) read the whole augment sequence. What a token may read is always a prefix of the augment's
tokenization of the full text, so one augment pass serves every anchor position.
"""

from __future__ import annotations

import bisect
from typing import Any, Optional, Sequence

import torch

from .padding import pad_rows, pad_token_id, row_slice

REPLACEMENT = "\ufffd"  # what decoding shows for an incomplete UTF-8 character


def require_fast(tokenizer: Any, role: str) -> None:
    """Refuse a tokenizer that cannot align texts by characters (a slow, pure-Python one)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The {role} tokenizer {type(tokenizer).__name__} is not a fast tokenizer; cross-tokenizer "
            "alignment needs character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` without special tokens and without a trailing incomplete character."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip(REPLACEMENT)


def anchor_token_ends(tokenizer: Any, ids: Sequence[int], known: Optional[Sequence[int]] = None) -> tuple[str, list[int]]:
    """The decoded text of anchor ``ids`` and where each token ends in it (characters).

    Args:
        tokenizer: the anchor's tokenizer.
        ids: the anchor's token ids of one sequence (no padding).
        known: ends already computed for a prefix of ``ids`` (generation extends them token by token).
    Returns:
        (text, ends) with ``len(ends) == len(ids)``.
    """
    special = set(tokenizer.all_special_ids)
    ends = list(known or [])
    real = [i for i in ids[: len(ends)] if i not in special]
    for k in range(len(ends), len(ids)):
        token = ids[k]
        if token in special:
            ends.append(ends[-1] if ends else 0)  # a special token adds no text
            continue
        real.append(token)
        ends.append(len(decode_text(tokenizer, real)))
    text = decode_text(tokenizer, real)
    for k, is_trailing in enumerate(anchor_trailing_specials(tokenizer, ids)):
        if is_trailing:
            ends[k] = len(text) + 1  # EOS and the like come after all the text
    return text, _non_decreasing(ends)


# Characters of several kinds: a pre-tokenizer that cuts this into one piece per character is character-level.
_CHARACTER_PROBE = "Ab  1,x\n\t-é東🙂."


def isolates_characters(tokenizer: Any) -> bool:
    """Whether the augment's pre-tokenizer makes every character its own piece (a character-level tokenizer).

    Then no piece can merge with text that follows, and everything up to the end of a text is settled.
    """
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is None:
        return False
    return [piece for piece, _ in pre.pre_tokenize_str(_CHARACTER_PROBE)] == list(_CHARACTER_PROBE)


def settled_cut(tokenizer: Any, text: str) -> int:
    """Where the last pre-token of ``text`` starts in the augment's pre-tokenization (0 if none).

    Text before that point tokenizes the same whatever follows; the last pre-token may still change.
    A character-level augment tokenizer settles every character: the cut is the end of ``text``.
    """
    return len(text) if isolates_characters(tokenizer) else _last_pretoken_start(tokenizer, text)


def _last_pretoken_start(tokenizer: Any, text: str) -> int:
    """:func:`settled_cut` for a tokenizer that is not character-level."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if pre is None:
        return 0 if not text else _settled_without_pretokenizer(tokenizer, text)
    pieces = pre.pre_tokenize_str(text)
    return pieces[-1][1][0] if pieces else 0


def _settled_without_pretokenizer(tokenizer: Any, text: str) -> int:
    # No pre-tokenizer: everything but the last token's text is taken as settled.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    return offsets[-1][0] if offsets else 0


def augment_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    """The augment's ids for ``text`` (its special tokens included) and which of them are special."""
    ids, special, _ = augment_encoding(tokenizer, text)
    return ids, special


def augment_encoding(tokenizer: Any, text: str) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """:func:`augment_tokens` with each token's (start, end) characters in ``text``, from one tokenization."""
    require_fast(tokenizer, "augment")
    encoded = tokenizer(text, return_special_tokens_mask=True, return_offsets_mapping=True)
    return (list(encoded["input_ids"]), [bool(m) for m in encoded["special_tokens_mask"]],
            list(encoded["offset_mapping"]))


def settled_limits(
    tokenizer: Any, text: str, anchor_ends: Sequence[int], full_ids: Sequence[int], anchor_trailing: Sequence[bool],
    known: Sequence[int] = (), unchanged: int = 0, encoding: Optional[tuple] = None,
) -> list[int]:
    """For each anchor token, how many leading augment tokens of ``full_ids`` it may read.

    Args:
        tokenizer: the augment's tokenizer.
        text: the full text (decoded anchor ids).
        anchor_ends: where each anchor token ends in ``text``.
        full_ids: the augment's ids for ``text``.
        anchor_trailing: True for anchor special tokens after the text (they read everything).
        known: limits computed before for a prefix of the anchor tokens (decoding: the text only grew), against
            augment ids whose first ``unchanged`` agree with ``full_ids``. A known limit below ``unchanged`` stays
            (it stopped where the augment's tokens of its prefix differ, and those did not move); the others are
            computed again, so a decoding step costs the new tokens' work, not the whole sequence's.
        encoding: :func:`augment_encoding` of ``text`` when the caller has it (a character-level augment reads
            its limits from the offsets; otherwise ``text`` is tokenized again).
    """
    if isolates_characters(tokenizer):
        return _character_limits(tokenizer, text, anchor_ends, full_ids, anchor_trailing, known, unchanged, encoding)
    by_cut: dict[int, int] = {}
    limits = []
    for k, (end, trailing) in enumerate(zip(anchor_ends, anchor_trailing)):
        if trailing:
            limits.append(len(full_ids))
            continue
        if k < len(known) and known[k] < unchanged:
            limits.append(known[k])
            continue
        cut = _last_pretoken_start(tokenizer, text[:end])
        if cut not in by_cut:
            ids, special = augment_tokens(tokenizer, text[:cut])
            # drop special tokens the tokenizer appends (EOS): they would say the text ends here
            last_text = max((k for k, is_special in enumerate(special) if not is_special), default=None)
            if last_text is None:
                ids = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
            else:
                ids = ids[: last_text + 1]
            common = 0
            while common < min(len(ids), len(full_ids)) and ids[common] == full_ids[common]:
                common += 1
            by_cut[cut] = common
        limits.append(by_cut[cut])
    return limits


def _character_limits(tokenizer: Any, text: str, anchor_ends: Sequence[int], full_ids: Sequence[int],
                      anchor_trailing: Sequence[bool], known: Sequence[int] = (), unchanged: int = 0,
                      encoding: Optional[tuple] = None) -> list[int]:
    """:func:`settled_limits` for a character-level augment tokenizer, from one tokenization of ``text``.

    Nothing merges, so the text up to an anchor token's end is settled: the token reads the augment's leading
    special tokens and every text token that ends by then (all the tokens of a character that takes several).
    A known limit below ``unchanged`` stays; each other limit is a binary search in the tokens' ends.
    """
    ids, special, offsets = encoding if encoding is not None else augment_encoding(tokenizer, text)
    if list(ids) != list(full_ids):
        raise ValueError("settled_limits: full_ids are not the augment's tokenization of the text")
    first_text = next((k for k, is_special in enumerate(special) if not is_special), len(ids))
    # readable text tokens: from the first one up to the next special token (an appended EOS); their ends are
    # non-decreasing (characters in order)
    stop = next((k for k in range(first_text, len(ids)) if special[k]), len(ids))
    # before any text token, only a BOS is readable (what the augment's tokenization of no text begins with)
    nothing_read = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    limits = []
    for k, (end, trailing) in enumerate(zip(anchor_ends, anchor_trailing)):
        if trailing:
            limits.append(len(full_ids))
        elif k < len(known) and known[k] < unchanged:
            limits.append(known[k])
        else:
            read = bisect.bisect_right(offsets, end, first_text, stop, key=lambda offset: offset[1]) - first_text
            limits.append(first_text + read if read else nothing_read)
    return limits


def anchor_trailing_specials(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    """True for the anchor's special tokens after the last text token (EOS and the like)."""
    special = set(tokenizer.all_special_ids)
    text_end = len(ids)  # one past the last text token: only the trailing run of special tokens is looked at
    while text_end and ids[text_end - 1] in special:
        text_end -= 1
    if not text_end:
        return [False] * len(ids)  # no text at all: nothing trails it
    return [False] * text_end + [True] * (len(ids) - text_end)


def _non_decreasing(values: list[int]) -> list[int]:
    out, top = [], 0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def align_batch(
    anchor_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    augment_tokenizers: Sequence[Any],
    padding_side: str = "right",
) -> dict[str, Any]:
    """Everything ``ComposedModel.forward`` and ``generate`` take, for anchor ids of several texts.

    Args:
        anchor_ids: per text, the anchor's ids (no padding).
        tokenizer: the anchor's tokenizer.
        augment_tokenizers: per augment, its tokenizer, or None when it shares the anchor's ids.
        padding_side: "right" (training) or "left" (generation).
    Returns:
        input_ids, attention_mask: (b, t); augment_input_ids, augment_attention_mask: per augment (b, s)
        or None; augment_limits: per augment, (b, t) long, anchor token t may read augment index < limit.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if any(len(r) == 0 for r in anchor_ids):
        raise ValueError("A text has no tokens; give non-empty texts")
    ids, mask = pad_rows([list(r) for r in anchor_ids], pad_token_id(tokenizer), padding_side)  # (b, t) each
    texts_and_ends = [anchor_token_ends(tokenizer, list(r)) for r in anchor_ids]
    out: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "augment_input_ids": [],
        "augment_attention_mask": [],
        "augment_limits": [],
    }
    for augment_tokenizer in augment_tokenizers:
        if augment_tokenizer is None:
            for key in ("augment_input_ids", "augment_attention_mask", "augment_limits"):
                out[key].append(None)
            continue
        rows, counts = [], []
        for row, (text, anchor_ends) in zip(anchor_ids, texts_and_ends):
            encoding = augment_encoding(augment_tokenizer, text)  # ids and offsets: a character augment's limits
            aug_ids = encoding[0]
            rows.append(aug_ids)
            trailing = anchor_trailing_specials(tokenizer, list(row))
            counts.append(settled_limits(augment_tokenizer, text, anchor_ends, aug_ids, trailing, encoding=encoding))
        aug_ids, aug_mask = pad_rows(rows, pad_token_id(augment_tokenizer), padding_side)  # (b, s) each
        limits = torch.zeros_like(ids)  # (b, t): an augment index counts the augment's own padding in front
        for b, (count, row) in enumerate(zip(counts, rows)):
            front = row_slice(len(row), aug_ids.shape[1], padding_side).start
            limits[b, row_slice(len(count), ids.shape[1], padding_side)] = torch.tensor(count, dtype=torch.long) + front
        out["augment_input_ids"].append(aug_ids)
        out["augment_attention_mask"].append(aug_mask)
        out["augment_limits"].append(limits)
    return out


def align_ids(input_ids: Any, attention_mask: Any, tokenizer: Any, augment_tokenizers: Sequence[Any]
              ) -> tuple[list, list, list]:
    """The augment inputs of anchor ids (b, t) padded on one side: each text re-tokenized for every augment with
    its own tokenizer, as :func:`align_batch` does from the ids of each text.

    Returns:
        per augment: augment_input_ids, augment_attention_mask, augment_limits (None for augments sharing the
        anchor's ids), on ``input_ids``' device.
    """
    import torch

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    side = "left" if bool((mask[:, 0] == 0).any()) else "right"
    aligned = align_batch([row[m.bool()].tolist() for row, m in zip(input_ids, mask)], tokenizer,
                          augment_tokenizers, side)
    if aligned["input_ids"].shape != input_ids.shape:
        raise ValueError("Pad the batch on one side only to let the composition align it; or pass "
                         "augment_input_ids and augment_limits (model.tokenize builds them)")
    moved = [[None if x is None else x.to(input_ids.device) for x in aligned[k]]
             for k in ("augment_input_ids", "augment_attention_mask", "augment_limits")]
    return moved[0], moved[1], moved[2]

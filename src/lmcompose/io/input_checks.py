"""Checks of user input against the base models, run before any work: context lengths."""

from __future__ import annotations

from typing import Any, Optional

from .jsonl import DataError

# Config attributes that bound how many positions a model reads (GPT-2 maps max_position_embeddings to n_positions).
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: Any) -> Optional[int]:
    """The most positions one transformers causal LM reads (its config's ``max_position_embeddings``), or None."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def composed_context_length(model: Any) -> tuple[Optional[int], str]:
    """The smallest context among a ComposedModel's anchor and the augments that read its token ids.

    Returns:
        (limit, which model sets it: "anchor" or "augment i"); (None, "") when no config states one.
    """
    candidates = [(context_length(getattr(model, "anchor", model)), "anchor")]
    augments = list(getattr(model, "augments", []))
    for a, augment in enumerate(augments):
        shares = model.shares_tokenizer(a) if hasattr(model, "shares_tokenizer") else True
        if shares:  # an augment with its own tokenizer reads other ids: its length is not the anchor's
            candidates.append((context_length(augment), "augment" if len(augments) == 1 else f"augment {a}"))
    known = [(limit, role) for limit, role in candidates if limit is not None]
    return min(known) if known else (None, "")


def check_example_lengths(dataset: Any, model: Any, what: str = "the data") -> None:
    """Refuse examples longer than the models read, naming the file and line of the longest one.

    Args:
        dataset: items with ``input_ids``; a :class:`~lmcompose.data.TokenizedDataset` read from a file
            knows each example's source and line.
        model: a ComposedModel (or one causal LM).
        what: how to name the data when it has no source file (e.g. "the training data").
    Raises:
        DataError: an example is longer than the smallest context; the message names where it is.
    """
    if len(dataset) == 0:
        return
    limit, role = composed_context_length(model)
    if limit is not None:
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > limit:
            too_long = sum(n > limit for n in lengths)
            raise DataError(
                f"{_where(dataset, longest, what)}: the example has {lengths[longest]} tokens but the {role} reads "
                f"at most {limit} (config.max_position_embeddings); {too_long} example(s) are longer. Truncate them "
                f"with --max-length {limit} (max_length={limit}) or shorten them"
            )
    _check_augment_token_lengths(dataset, model, what)


def _check_augment_token_lengths(dataset: Any, model: Any, what: str) -> None:
    """The same check for augments with their own tokenizer: each text re-tokenized as the augment reads it."""
    from ..core.alignment import augment_tokens, decode_text

    own = [(a, t) for a, t in enumerate(getattr(model, "augment_tokenizers", []) or []) if t is not None]
    for a, augment_tokenizer in own:
        limit = context_length(model.augments[a])
        if limit is None:
            continue
        role = "augment" if len(model.augments) == 1 else f"augment {a}"
        for i in range(len(dataset)):
            text = decode_text(model.tokenizer, dataset[i]["input_ids"])
            n = len(augment_tokens(augment_tokenizer, text)[0])
            if n > limit:
                raise DataError(
                    f"{_where(dataset, i, what)}: the example's text is {n} tokens in the {role}'s own tokenizer, "
                    f"but the {role} reads at most {limit} (config.max_position_embeddings). Shorten it, or lower "
                    "--max-length (max_length) until the text fits"
                )


def _where(dataset: Any, index: int, what: str) -> str:
    source = getattr(dataset, "source", None)
    features = getattr(dataset, "features", None)
    line = features[index].get("line") if isinstance(features, list) and isinstance(features[index], dict) else None
    if source and line:
        return f"{source}, line {line}"
    return f"{source or what}, example {index}"

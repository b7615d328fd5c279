"""Checks of user input against the base models, run before any work: context length, shared tokenizers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .data import DataError

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
    limit, role = composed_context_length(model)
    if limit is None or len(dataset) == 0:
        return
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] <= limit:
        return
    too_long = sum(n > limit for n in lengths)
    raise DataError(
        f"{_where(dataset, longest, what)}: the example has {lengths[longest]} tokens but the {role} reads at most "
        f"{limit} (config.max_position_embeddings); {too_long} example(s) are longer. Truncate them with "
        f"--max-length {limit} (max_length={limit}) or shorten them"
    )


def _where(dataset: Any, index: int, what: str) -> str:
    source = getattr(dataset, "source", None)
    features = getattr(dataset, "features", None)
    line = features[index].get("line") if isinstance(features, list) and isinstance(features[index], dict) else None
    if source and line:
        return f"{source}, line {line}"
    return f"{source or what}, example {index}"


def same_tokenizer(anchor: Any, augment: Any) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary)."""
    if augment is None or augment is anchor:
        return True
    try:
        return anchor.get_vocab() == augment.get_vocab()
    except (AttributeError, NotImplementedError):
        return False


def differing_tokenizers(tokenizer: Any, augment_tokenizers: Sequence[Any]) -> list[int]:
    """The indices of the augments whose tokenizer is not the anchor's."""
    return [a for a, t in enumerate(augment_tokenizers) if not same_tokenizer(tokenizer, t)]

"""Tokenized examples: prompt tokens carry no loss, completion (and text) tokens are their own labels."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from ..core.padding import IGNORE_INDEX
from ..core.tokens import encode_prompt
from .jsonl import DataError, Records, read_jsonl

logger = logging.getLogger(__name__)


class TokenizedDataset(Dataset):
    """Tokenized examples: each item is ``{"input_ids": [...], "labels": [...]}`` (lists of ints).

    Args:
        features: one dict per example with ``input_ids`` and ``labels`` (same length) and, for
            prompt/completion data, ``prompt_length`` (tokens before the completion).
        kind: "completion" or "text".
        references: the completion text of each example (prompt/completion data), else None.
        num_truncated: how many examples were cut to the maximum length.
        num_dropped: how many examples were left out because truncation removed every labelled token.
        source: the file the examples were read from (errors name it with a feature's ``line``), or None.
    """

    def __init__(
        self,
        features: list[dict[str, Any]],
        kind: str = "text",
        references: Optional[list[str]] = None,
        num_truncated: int = 0,
        num_dropped: int = 0,
        source: Optional[str] = None,
    ) -> None:
        if not features:
            raise DataError("No examples left to train on")
        self.features = features
        self.kind = kind
        self.references = references
        self.num_truncated = num_truncated
        self.num_dropped = num_dropped
        self.source = source

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        feature = self.features[index]
        return {"input_ids": feature["input_ids"], "labels": feature["labels"]}

    @property
    def has_completions(self) -> bool:
        """Whether the examples are prompt/completion pairs (exact match can be scored)."""
        return self.kind == "completion" and self.references is not None

    def prompt_ids(self, index: int) -> list[int]:
        """The prompt tokens of a prompt/completion example (what generation starts from)."""
        feature = self.features[index]
        return feature["input_ids"][: feature["prompt_length"]]

    @classmethod
    def from_token_ids(cls, sequences: Sequence[Sequence[int]]) -> "TokenizedDataset":
        """Text examples straight from token ids (loss on every token).

        Args:
            sequences: one list of ids per example.
        """
        return cls([{"input_ids": list(map(int, s)), "labels": list(map(int, s))} for s in sequences])


def tokenize_records(
    records: Records, tokenizer: Any, max_length: Optional[int] = None, append_eos: bool = True
) -> TokenizedDataset:
    """Tokenize records: prompt tokens get label -100, completion (and text) tokens are their own labels.

    The prompt gets the tokenizer's BOS when it adds one by default; EOS is appended to each
    completion and text. Examples longer than ``max_length`` are cut at the end (counted in
    ``num_truncated`` and logged); one that keeps no labelled token is left out (``num_dropped``).

    Args:
        records: from :func:`read_jsonl`.
        tokenizer: a transformers tokenizer.
        max_length: the most tokens per example; None for no limit.
        append_eos: put the EOS token after each completion / text.
    """
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    features, references = [], []
    truncated = dropped = 0
    for row, line in zip(records.rows, records.lines):
        if records.kind == "completion":
            prompt = encode_prompt(tokenizer, row["prompt"])
            completion = list(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + eos
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        else:
            ids = encode_prompt(tokenizer, row["text"]) + eos
            labels = list(ids)
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
                dropped += 1
                logger.debug("%s, line %d: no completion token left within max_length", records.source, line)
                continue
        feature = {"input_ids": ids, "labels": labels, "line": line}
        if records.kind == "completion":
            feature["prompt_length"] = len(prompt)
            references.append(row["completion"])
        features.append(feature)
    if truncated:
        logger.warning(
            "%s: %d of %d examples were longer than max_length=%s and were truncated%s",
            records.source,
            truncated,
            len(records.rows),
            max_length,
            f"; {dropped} kept no completion token and were left out" if dropped else "",
        )
    if not features:
        raise DataError(
            f"{records.source}: no example keeps a completion token within max_length={max_length}; raise --max-length"
        )
    return TokenizedDataset(
        features,
        kind=records.kind,
        references=references if records.kind == "completion" else None,
        num_truncated=truncated,
        num_dropped=dropped,
        source=records.source,
    )


def load_dataset(
    path: Union[str, Path], tokenizer: Any, max_length: Optional[int] = None, append_eos: bool = True
) -> TokenizedDataset:
    """Read and tokenize a JSONL file; see :func:`read_jsonl` and :func:`tokenize_records`."""
    return tokenize_records(read_jsonl(path), tokenizer, max_length=max_length, append_eos=append_eos)


def data_fingerprint(dataset: Dataset) -> str:
    """A sha256 over every example's input ids (and labels): tells two data sets apart."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        rows = [item.get(key) for key in ("input_ids", "labels")] + list(item.get("preserve", []))
        for values in rows:
            if values is not None:
                values = np.asarray(values, dtype=np.int64)
                digest.update(np.int64(values.size).tobytes())
                digest.update(values.tobytes())
    return digest.hexdigest()


class WithPreservation(Dataset):
    """Training examples that each carry some preservation texts: ordinary text on which the composed model is
    trained to keep the anchor's own next-token distribution (see ``TrainingConfig.preserve_weight``).

    Example ``i`` carries the texts ``floor(i r) .. floor((i + 1) r) - 1`` (modulo their number) for ``r`` =
    ``ratio``: about ``r`` texts per example, always the same ones for the same example, so a resumed run sees
    exactly what an uninterrupted one sees.

    Args:
        dataset: the training examples.
        preserve: the preservation texts (items with ``input_ids``).
        ratio: preservation texts per training example (0.25: one with every fourth example).
    """

    def __init__(self, dataset: Dataset, preserve: Dataset, ratio: float = 1.0) -> None:
        if len(preserve) == 0:
            raise DataError("The preservation data holds no texts")
        if not ratio > 0:
            raise ValueError(f"The preservation ratio must be > 0, got {ratio!r}")
        self.dataset, self.preserve, self.ratio = dataset, preserve, ratio

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        first, end = int(index * self.ratio), int((index + 1) * self.ratio)
        item["preserve"] = [list(self.preserve[k % len(self.preserve)]["input_ids"]) for k in range(first, end)]
        return item

    def __getattr__(self, name: str) -> Any:  # source, features, ... of the wrapped examples
        if name in ("dataset", "preserve", "ratio"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

"""JSONL data: reading {"prompt", "completion"} or {"text"} records, tokenizing with label masks, collating."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
COMPLETION_KEYS = ("prompt", "completion")
TEXT_KEYS = ("text",)


class DataError(ValueError):
    """A data file cannot be used; the message names the file and, where it applies, the line."""


@dataclass
class Records:
    """The records of one JSONL file, all of one format.

    Args:
        kind: "completion" ({"prompt", "completion"}: loss on the completion) or "text" (loss on all tokens).
        rows: one dict per example with the format's string fields.
        lines: the 1-based line number each row came from.
        source: the file they were read from.
    """

    kind: str
    rows: list[dict[str, str]]
    lines: list[int]
    source: str


def read_jsonl(path: Union[str, Path]) -> Records:
    """Read a JSONL file of ``{"prompt", "completion"}`` or ``{"text"}`` records (one format per file).

    Blank lines are skipped; keys other than the format's are ignored.

    Args:
        path: the file.
    Returns:
        the records; every error (malformed JSON, missing or ill-typed field, mixed formats, empty file)
        raises :class:`DataError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file" + (" (it is a directory)" if path.is_dir() else ""))
    kind, first_line = None, 0
    rows, lines = [], []
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read the data file ({err.strerror or err})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}, line {number}"
            line = _decode_line(raw, number, where)
            if not line.strip():
                continue
            record = _parse_line(line, where)
            this = _record_kind(record, where)
            if kind is None:
                kind, first_line = this, number
            elif this != kind:
                raise DataError(
                    f"{where}: a {_describe(this)} record, but line {first_line} starts a file of "
                    f"{_describe(kind)} records; use one format per file"
                )
            keys = COMPLETION_KEYS if this == "completion" else TEXT_KEYS
            for key in keys:
                if not isinstance(record[key], str):
                    raise DataError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
                try:
                    record[key].encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f'{where}: "{key}" holds an unpaired surrogate escape (\\ud800-\\udfff), '
                                    "which is not text") from None
            rows.append({key: record[key] for key in keys})
            lines.append(number)
    if not rows:
        raise DataError(f"{path}: the file holds no examples (it is empty)")
    return Records(kind=kind, rows=rows, lines=lines, source=str(path))


def _decode_line(raw: bytes, number: int, where: str) -> str:
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: the JSON is nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{where}: not usable JSON ({err})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _record_kind(record: dict, where: str) -> str:
    has_text = "text" in record
    has_pair = [k for k in COMPLETION_KEYS if k in record]
    if has_text and has_pair:
        raise DataError(f'{where}: give either "text" or "prompt"/"completion", not both')
    if has_text:
        return "text"
    if len(has_pair) == 2:
        return "completion"
    if has_pair:
        missing = next(k for k in COMPLETION_KEYS if k not in record)
        raise DataError(f'{where}: missing field "{missing}" (a record needs "prompt" and "completion")')
    raise DataError(
        f'{where}: expected fields "prompt" and "completion", or "text"; found {sorted(record) or "none"}'
    )


def _describe(kind: str) -> str:
    return '{"prompt", "completion"}' if kind == "completion" else '{"text"}'


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


def pad_token_id(tokenizer: Any = None, model: Any = None) -> int:
    """The id used for padding: the tokenizer's pad (else EOS) token, else the anchor config's, else 0."""
    for source in (tokenizer, getattr(getattr(model, "anchor", model), "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


@dataclass(frozen=True)
class Collator:
    """Pads a list of examples into a batch (dynamic padding: to the longest example).

    Each example is ``{"input_ids", "labels"?, "augment_states"?}``; ``augment_states`` (per augment,
    ``{layer: (T_i, D_A)}``) is padded with zeros like the ids. Augments with their own tokenizer get
    their ids from the anchor's: the text is decoded and aligned (:func:`lmcompose.alignment.align_batch`).

    Args:
        pad_token_id: id placed on padding.
        padding_side: "right" or "left".
        tokenizer: the anchor's tokenizer; needed only with ``augment_tokenizers``.
        augment_tokenizers: per augment, its tokenizer, or None where it reads the anchor's ids
            (``ComposedModel.augment_tokenizers``).
    Returns (from a call):
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (0 on padding), ``labels`` (B, T)
        long (-100 on padding), ``augment_states`` (per augment, ``{layer: (B, T, D_A)}``) when given,
        and, when an augment has its own tokenizer, ``augment_input_ids``, ``augment_attention_mask``
        (per augment (B, S) or None) and ``augment_limits`` (per augment (B, T) or None).
    """

    pad_token_id: int = 0
    padding_side: str = "right"
    tokenizer: Any = None
    augment_tokenizers: tuple = ()

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if any(t is not None for t in self.augment_tokenizers) and self.tokenizer is None:
            raise ValueError("Collator: augment_tokenizers need the anchor's tokenizer as well (tokenizer=)")

    def _place(self, length: int, total: int) -> slice:
        return slice(total - length, total) if self.padding_side == "left" else slice(0, length)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples]
        labels = [torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long) for e in examples]
        b, t = len(ids), max(len(x) for x in ids)
        batch_ids = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels)):
            where = self._place(len(x), t)
            batch_ids[row, where] = x
            batch_labels[row, where] = y
            mask[row, where] = 1
        batch: dict[str, Any] = {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}
        if "augment_states" in examples[0]:
            batch["augment_states"] = self._pad_states([e["augment_states"] for e in examples], t)
        if any(tok is not None for tok in self.augment_tokenizers):
            from .alignment import align_batch

            aligned = align_batch([x.tolist() for x in ids], self.tokenizer, self.augment_tokenizers, self.padding_side)
            for key in ("augment_input_ids", "augment_attention_mask", "augment_limits"):
                batch[key] = aligned[key]  # same padding of the anchor ids, so limits index this batch
        return batch

    def _pad_states(self, states: list[list[dict[int, torch.Tensor]]], t: int) -> list[dict[int, torch.Tensor]]:
        """Per example, per augment {layer: (T_i, D_A)} -> per augment {layer: (B, T, D_A)}."""
        padded = []
        for a, layers in enumerate(states[0]):
            out = {}
            for layer, first in layers.items():
                full = first.new_zeros((len(states), t, first.shape[-1]))  # (B, T, D_A)
                for row, example in enumerate(states):
                    x = example[a][layer]  # (T_i, D_A)
                    full[row, self._place(x.shape[0], t)] = x
                out[layer] = full
            padded.append(out)
        return padded


def collator_for(model: Any, tokenizer: Any = None, padding_side: str = "right") -> Collator:
    """The collator a ComposedModel's batches need: its pad id, and alignment for augments with their own tokenizer.

    Args:
        model: a ComposedModel (or one causal LM).
        tokenizer: the anchor's tokenizer, for the pad id (else the anchor config's).
        padding_side: "right" or "left".
    """
    own = tuple(getattr(model, "augment_tokenizers", None) or ())
    if not any(t is not None for t in own):
        return Collator(pad_token_id(tokenizer, model), padding_side)
    return Collator(pad_token_id(tokenizer, model), padding_side, model.tokenizer, own)


def data_fingerprint(dataset: Dataset) -> str:
    """A sha256 over every example's input ids (and labels): tells two data sets apart."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        for key in ("input_ids", "labels"):
            if key in item:
                values = np.asarray(item[key], dtype=np.int64)
                digest.update(np.int64(values.size).tobytes())
                digest.update(values.tobytes())
    return digest.hexdigest()


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of the examples each epoch that depends only on (seed, epoch).

    The order of any epoch can be rebuilt after a restart, which makes resumed runs exact.
    ``set_epoch`` follows the torch/accelerate convention (as DistributedSampler).

    Args:
        size: number of examples.
        seed: the run's seed.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size

"""JSONL data files: ``{"prompt", "completion"}`` or ``{"text"}`` records, every error naming the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

MAX_LINE_BYTES = 8 << 20  # one example; a longer line is refused before it is held in memory whole
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
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path}, line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: the line is longer than {MAX_LINE_BYTES:,} bytes; split the example or "
                                "shorten it (examples are cut to --max-length tokens anyway)")
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

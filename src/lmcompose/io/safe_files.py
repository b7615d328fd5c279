"""Reading files a user or a crash may have damaged: JSON and YAML with bounds on size, depth and aliases, digests.

Every failure is a ``ValueError`` whose message names the file, never a RecursionError, a MemoryError or a YAML
alias expanding without end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

MAX_CONFIG_BYTES = 1 << 20  # JSON/YAML configs and run records lmcompose writes are far smaller
MAX_DEPTH = 64  # nesting of those files is a handful of levels


def file_digest(path: Union[str, Path]) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_digest(data: bytes) -> str:
    """The sha256 of ``data`` (hex)."""
    return hashlib.sha256(data).hexdigest()


def read_text(path: Union[str, Path], what: str = "file", max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a small file; refuses a file larger than ``max_bytes`` or not UTF-8, naming it."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: the {what} has {size:,} bytes, more than the {max_bytes:,} a {what} may have; "
                         "it is damaged or not one lmcompose wrote")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: the {what} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_json(text: str, where: str) -> Any:
    """JSON text parsed with a depth bound; every failure a ValueError naming ``where``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: the JSON is nested too deeply to read") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ValueError(f"{where}: not usable JSON ({err})") from None
    _check_depth(value, where)
    return value


def read_json(path: Union[str, Path], what: str = "file", max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A small JSON file, read with the bounds of :func:`read_text` and :func:`parse_json`."""
    return parse_json(read_text(path, what, max_bytes), str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML text through a safe loader that refuses aliases (``*name``: the way a few bytes expand into gigabytes)
    and deep nesting; every failure a ValueError naming ``where``."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
            return super().compose_node(parent, index)

    try:
        value = yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise ValueError(f"{where}: the YAML is nested too deeply to read") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    _check_depth(value, where)
    return value


def _check_depth(value: Any, where: str) -> None:
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested more than {MAX_DEPTH} levels deep; not a file lmcompose reads")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)

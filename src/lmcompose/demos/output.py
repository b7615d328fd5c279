"""A demo's output directory: it belongs to one demo, whose caches and results it holds."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..io.atomic import atomic_write_text
from ..io.locks import output_lock

MARKER = "demo.json"
# A folder only each demo's cache has: how an output directory written before the marker existed is recognised.
CACHE_FOLDERS = {"kv": "bases", "facts": "augments"}


@contextmanager
def demo_output(out: Path, demo: str) -> Iterator[Path]:
    """The demo's output directory, checked (:func:`check_output`) and locked while the block runs."""
    check_output(out, demo)
    with output_lock(out, f"the {demo} demo"):
        yield out


def check_output(out: Path, demo: str) -> None:
    """Refuse an output directory that holds another demo's files (its caches would be mixed up with this one's)."""
    marker = out / MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text(encoding="utf-8")).get("demo")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            owner = None
        if owner != demo:
            raise ValueError(f"{out} holds the files of the {owner or 'unknown'} demo ({marker}); "
                             f"give the {demo} demo another --output")
    else:
        for other, folder in CACHE_FOLDERS.items():
            if other != demo and (out / folder).is_dir():
                raise ValueError(f"{out} holds the files of the {other} demo ({out / folder}); "
                                 f"give the {demo} demo another --output")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"demo": demo}))

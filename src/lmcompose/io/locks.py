"""One run per output directory: an exclusive lock held for the run's lifetime, naming its holder when refused.

The lock is the operating system's (``flock``, through the ``filelock`` package): when its holder dies, the kernel
releases it, so a stale lock of a killed run is taken over without any clean-up. Within one process it is reentrant
(the CLI and the training recipe both take it).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from .atomic import atomic_write_text

LOCK_NAME = ".lmcompose.lock"
OWNER_NAME = ".lmcompose.lock.json"  # who holds the lock: pid, host, what, since when


class OutputInUseError(OSError):
    """Another process holds the lock of the output directory; the message names it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)

    def __str__(self) -> str:
        return self.strerror


@contextmanager
def output_lock(directory: Union[str, Path], what: str) -> Iterator[None]:
    """Hold the output directory's lock while the block runs (creating the directory).

    Args:
        directory: the run's output directory.
        what: what this process does there (``"training"``, ``"the facts demo"``), for the message of another.
    Raises:
        OutputInUseError: another live process holds it.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_NAME, timeout=0, is_singleton=True, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUseError(f"{directory} is in use by {_holder(directory)}; wait for it to end, or give another "
                               "output directory") from None
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(directory / OWNER_NAME, json.dumps(owner))
        yield
    finally:
        if outermost:
            (directory / OWNER_NAME).unlink(missing_ok=True)
        lock.release()


def _holder(directory: Path) -> str:
    """The lock holder as the owner file says (a process that is just starting may not have written it yet)."""
    try:
        owner = json.loads((directory / OWNER_NAME).read_text(encoding="utf-8")[:4096])
        return f"process {int(owner['pid'])} on {owner['host']} ({owner['what']} since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"

"""Atomic files and directories: a reader finds the old version or the new one, never a mix or a torn file."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, Path]


def fsync_dir(directory: PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """A write failed because the device is full; the message names the file and the space it needs."""

    def __init__(self, path: PathLike, free: int, needed: int) -> None:
        super().__init__(errno.ENOSPC, f"No space left on the device of {path}: {free:,} bytes free, writing it needs "
                                       f"about {needed:,}; free space and run again (training continues from its last "
                                       "complete checkpoint with --resume)", str(path))

    def __str__(self) -> str:
        return self.strerror


def disk_full(err: BaseException, directory: PathLike) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC anywhere in its chain, or (torch and safetensors say
    it in their own words) less than 1 MiB left on the device as it failed."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def atomic_write(path: PathLike, write: Callable[[str], None], size_hint: int = 0) -> None:
    """Call ``write(tmp_path)`` then move the result to ``path``: readers see the old file or the new one.

    Args:
        size_hint: about how many bytes ``write`` writes, for the message when the disk fills up.
    Raises:
        DiskFullError: the device filled up (the old file, if any, is untouched and no temporary file is left).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and disk_full(err, path.parent)  # checked while the partial file fills it
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise DiskFullError(path, shutil.disk_usage(path.parent).free, max(size_hint, written + (1 << 20))) from err
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write a text file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def remove_directory(path: PathLike) -> None:
    """Delete a directory so that a kill midway never leaves it half there under its own name: it is first renamed
    to ``.NAME.old-PID`` (atomic), then removed; :func:`remove_unpublished` finishes a delete cut short."""
    path = Path(path)
    doomed = path.parent / f".{path.name}.old-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def publish_directory(tmp: PathLike, final: PathLike) -> None:
    """Put the complete directory ``tmp`` in place of ``final``: a reader finds the old one, the new one, or none,
    never a mix of the two (files written at different times would pass each other's size checks)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        remove_directory(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_unpublished(directory: PathLike, name: str) -> None:
    """Delete ``.NAME.tmp-*`` and ``.NAME.old-*`` directories a kill left next to ``directory/NAME``."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_dir() and (p.name.startswith(f".{name}.tmp-") or p.name.startswith(f".{name}.old-")):
                shutil.rmtree(p, ignore_errors=True)


def remove_stale_temporaries(directory: PathLike) -> None:
    """Delete the ``.NAME.*.tmp`` files an atomic write cut short by a kill left in ``directory``."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)

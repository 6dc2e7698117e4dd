"""The one way promptmill writes a file: whole or not at all, and still there after a power cut.

The bytes go to a temporary name in the same folder, are fsynced, renamed over
the target, and the folder is fsynced so the rename itself is on disk. A failure
at any step removes the temporary file and raises the ``OSError`` unchanged:
callers say what the file was (see :class:`batch.errors.DiskError`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar, overload

__all__ = ["atomic_write", "fsync_dir"]

T = TypeVar("T")


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@overload
def atomic_write(path: Path, data: bytes) -> None: ...
@overload
def atomic_write(path: Path, data: Callable[[BinaryIO], T]) -> T: ...
def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], T]) -> T | None:
    """Write ``data`` (bytes, or a function writing to the open file) to ``path`` atomically and durably.

    Returns what the function returned (None for bytes).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            result: T | None = None
            if isinstance(data, bytes):
                fh.write(data)
            else:
                result = data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()  # half a file takes space and is never read: gone
        raise
    fsync_dir(path.parent)
    return result

"""The lock that keeps two runs from writing one output."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from batch.errors import OutputBusy
from batch.store.parts import parts_dir

__all__ = ["OutputLock"]


class OutputLock:
    """An exclusive lock on one output, held for a run's lifetime.

    ``flock`` is released by the kernel when the process dies, so a killed run
    never leaves the output locked.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = parts_dir(output) / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = ""
                with contextlib.suppress(OSError, ValueError):
                    holder = f" (process {int(self.path.read_text().strip())})"
                raise OutputBusy(
                    f"another promptmill run is writing this output{holder}; wait for it or choose another output",
                    path=self.output,
                ) from None
            # The run that held it may have removed the folder (lock file included) as it
            # finished: a lock on that deleted file protects nothing, so take the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

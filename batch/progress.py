"""Progress on long work: a bar on a terminal, a log line now and then elsewhere (cron, Airflow)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger("batch.progress")


class Progress:
    """Counts finished rows. ``update`` is called once per row, so it does almost nothing."""

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool | None = None,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self._clock = clock
        self._start = clock()
        self._next_log = self._start + log_every_s
        self._log_every_s = log_every_s
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # imported only for a terminal

            self._bar = tqdm(total=total, unit="row", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)

    def update(self, ok: bool) -> None:
        self.done += 1
        if not ok:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.done % 64 == 0:  # the clock is read every 64 rows, not every row
            now = self._clock()
            if now >= self._next_log:
                self._next_log = now + self._log_every_s
                self._log(now)

    def skip(self, n: int) -> None:
        """Rows an earlier run finished: they count toward the total, not the rate."""
        if self._bar is not None and n:
            self._bar.update(n)

    def _log(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        log.info("progress: %s%s rows, %s failed, %.1f rows/s", f"{self.done:,}", of, f"{self.failed:,}", rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

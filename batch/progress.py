"""Progress on long work: a bar on a terminal, a log line now and then elsewhere (cron, Airflow).

Both show rows done, rows/s, tokens/s and the time left, and, given the job's money
(:class:`batch.budget.Ledger`), the cost spent and reserved by rows in flight and,
with a budget, what is left of it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Money", "Progress"]

log = logging.getLogger("batch.progress")

# the bar's money and token figures are refreshed every this many rows
_REFRESH_ROWS = 64


class Money(Protocol):
    """What progress shows of the job's money (:class:`batch.budget.Ledger`, or the figures a
    job on Ray gathers in its limiter actor)."""

    limit: float | None

    @property
    def spent(self) -> float: ...

    @property
    def reserved(self) -> float: ...

    @property
    def left(self) -> float | None: ...


class Progress:
    """Counts finished rows. ``update`` is called once per row, so it does almost nothing."""

    def __init__(
        self,
        total: int | None,
        *,
        enabled: bool | None = None,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        money: Money | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.skipped = 0
        self.failed = 0
        self.tokens = 0
        self.money = money
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

    def update(self, ok: bool, tokens: int = 0) -> None:
        self.done += 1
        self.tokens += tokens
        if not ok:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            if self.done % _REFRESH_ROWS == 0:
                self._bar.set_postfix_str(self._extra(self._clock()), refresh=False)
        elif self.done % _REFRESH_ROWS == 0:  # the clock is read every 64 rows, not every row
            now = self._clock()
            if now >= self._next_log:
                self._next_log = now + self._log_every_s
                self._log(now)

    def skip(self, n: int) -> None:
        """Rows an earlier run finished: they count toward the total, not the rate."""
        self.skipped += n
        if self._bar is not None and n:
            self._bar.update(n)

    def set_totals(self, done: int, failed: int, tokens: int, skipped: int) -> None:
        """Totals counted elsewhere (the workers of a job on Ray), instead of :meth:`update` a row."""
        moved = done + skipped - self.done - self.skipped
        self.done, self.failed, self.tokens, self.skipped = done, failed, tokens, skipped
        now = self._clock()
        if self._bar is not None:
            self._bar.update(moved)
            self._bar.set_postfix_str(self._extra(now), refresh=False)
        elif now >= self._next_log:
            self._next_log = now + self._log_every_s
            self._log(now)

    def _extra(self, now: float) -> str:
        """``tokens/s`` and the money: ``$spent spent, $reserved reserved[, $left left of $budget]``."""
        text = f"{self.tokens / max(now - self._start, 1e-9):,.0f} tokens/s"
        money = self.money
        if money is not None:
            text += f", ${money.spent:.4f} spent, ${money.reserved:.4f} reserved"
            if money.limit is not None:
                text += f", ${money.left or 0.0:.4f} left of ${money.limit:.4f}"
        return text

    def line(self, now: float) -> str:
        """The log line: rows, failed, rows/s, tokens/s, the money, and the time left when the total is known."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total:,}" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            left = max(self.total - self.done - self.skipped, 0) / rate
            eta = f", ETA {left:,.0f} s"
        return (f"progress: {self.done + self.skipped:,}{of} rows, {self.failed:,} failed, {rate:.1f} rows/s, "
                f"{self._extra(now)}{eta}")

    def _log(self, now: float) -> None:
        log.info("%s", self.line(now))

    def log_now(self) -> None:
        """The log line now (a job on Ray ends with one: its figures gathered from every worker)."""
        self._log(self._clock())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

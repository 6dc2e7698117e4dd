"""Progress of a job on Ray, shown by the driver: the rows, tokens and cost the limiter actor
gathers from every worker's reports, asked for once a second (a bar on a terminal, a log line
every 30 s elsewhere, as on one machine)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from batch.progress import Progress

__all__ = ["ProgressView"]

log = logging.getLogger(__name__)

_EVERY_S = 1.0


@dataclass(slots=True)
class _Money:
    """The job's money as the actor last said it (what :class:`batch.progress.Money` asks for)."""

    limit: float | None
    spent: float = 0.0
    reserved: float = 0.0

    @property
    def left(self) -> float | None:
        return None if self.limit is None else max(self.limit - self.spent - self.reserved, 0.0)


class ProgressView:
    """A thread asking the limiter actor for the job's figures; stopped (joined) before Ray is shut down."""

    def __init__(self, limiter: Any, total: int | None, enabled: bool | None, budget: float | None,
                 log_every_s: float = 30.0) -> None:
        self._limiter = limiter
        self._money = _Money(budget)
        self.progress = Progress(total, enabled=enabled, money=self._money, log_every_s=log_every_s)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptmill-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(_EVERY_S):
            self.refresh()

    def refresh(self) -> None:
        import ray

        try:
            p = ray.get(self._limiter.progress.remote(), timeout=5.0)
        except Exception as exc:  # the actor busy or gone: progress waits for the next time
            log.debug("no progress from the limiter actor: %s", exc)
            return
        self._money.spent, self._money.reserved = p["spent"], p["reserved"]
        self.progress.set_totals(p["done"], p["failed"], p["tokens"], p["skipped"])

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        self.refresh()  # the last figures
        self.progress.close()
        self.progress.log_now()

"""The driver's watch of a job on Ray: its progress, and a stop asked by a signal.

Progress: the rows, tokens and cost the limiter actor gathers from every worker's reports,
asked for once a second (a bar on a terminal, a log line every 30 s elsewhere, as on one
machine). A first SIGINT or SIGTERM asks the workers, through the actor, to send nothing
more and finish their requests in flight (within ``grace_s``), so every answer paid for is
kept; a second signal, or the grace running out, stops the driver's wait at once.
An input whose size or modification time changes while the job runs stops every
worker, as on one machine (exit 65).
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from batch.errors import InputChanged
from batch.job import input_change
from batch.progress import Progress

__all__ = ["Interrupted", "ProgressView", "StopAsked"]

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


class Interrupted(Exception):
    """A second signal (or the grace run out): the driver stops waiting for blocks at once."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name


class StopAsked:
    """The driver's SIGINT/SIGTERM handler: the first is noted (the watch thread acts on it: a
    handler must not call Ray or log), a second raises :class:`Interrupted`."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None

    def handler(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum


class ProgressView:
    """A thread asking the limiter actor for the job's figures; stopped (joined) before Ray is shut down."""

    def __init__(self, limiter: Any, total: int | None, enabled: bool | None, budget: float | None,
                 stop: StopAsked, input_seen: tuple[str, int, int], log_every_s: float = 30.0) -> None:
        self._limiter = limiter
        self._stop = stop
        self._input: tuple[str, int, int] | None = input_seen  # path, size, mtime at start; None once told
        self._deadline: float | None = None  # of the grace, once a signal came
        self._money = _Money(budget)
        self.progress = Progress(total, enabled=enabled, money=self._money, log_every_s=log_every_s)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptmill-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(_EVERY_S):
            self.refresh()
            self._stopping()
            self._check_input()

    def _check_input(self) -> None:
        """An input changed while the job runs: every worker stops, the job exits 65."""
        if self._input is None:
            return
        path, size, mtime = self._input
        change = input_change(path, (size, mtime))
        if change is None:
            return
        self._input = None
        stop = InputChanged(f"{path}: the input changed while the job ran ({change}): stopping; every finished "
                            "row is kept; rerun the same command once the input is final")
        self._limiter.stop.remote(str(stop), stop.exit_code)

    def _stopping(self) -> None:
        """After a first signal: ask the workers to stop; once the grace is out, stop at once."""
        signum = self._stop.signum
        if signum is None:
            return
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._stop.grace_s
            log.warning("%s: the workers send nothing more and finish their requests in flight (up to %.0f s); "
                        "send it again to stop at once", signal.Signals(signum).name, self._stop.grace_s)
            self._limiter.drain.remote()
        elif now > self._deadline:
            self._deadline = float("inf")
            log.warning("the workers did not finish within %.0f s: stopping now", self._stop.grace_s)
            _thread.interrupt_main(signal.Signals(signum))  # as a second signal to the handler

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

"""One limiter for the cluster: a named actor per job, and the worker's lease of it.

:class:`ClusterLimiter` runs as one named Ray actor per job (see
:mod:`batch.engines.ray_engine`). It holds promptmill's own
:class:`~batch.limiter.Limiter` (the RPM/TPM pace, the ``x-ratelimit-*``
headers, the adaptive state learned from 429s), the fatal-stop flag, the run
numbers that keep the workers' part files apart, and the job's counters.

A worker does not ask it once a request: :class:`LeasedLimiter` (the worker's
stand-in for a :class:`~batch.limiter.Limiter`) takes a small *lease* of
admissions at a time and sends what happened to them (answers, headers, 429s,
token counts) back in batches, with its next lease or its regular report. The
actor admits the leased requests through its limiter one by one, at the
limiter's pace, so the cluster as a whole keeps to the limits; a lease is held
at most by a few requests, so the burst it can make is small. A 429 is
reported at once, so every worker pauses with the first one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from batch.limiter import Limiter, Reservation
from batch.ratelimits import retry_after

__all__ = ["ClusterLimiter", "LeasedLimiter", "Report"]

log = logging.getLogger(__name__)

# A report: (reservation id, what happened, headers, tokens charged).
# what: "ok" (an answer), "done" (an error answer: keep the estimate), "gone" (no answer: refund), "429".
Report = tuple[int, str, dict[str, str] | None, int | None]

_LEASE_LIMITED = 2  # admissions a lease takes when a limit paces requests: a small burst
_LEASE_FREE = 64  # when nothing limits them: few round trips
# The share of a given limit the cluster paces to: below one machine's 0.98, for the leases'
# small bursts and the spread of the hops between the actor, the workers and the server.
_CLUSTER_UTILIZATION = 0.9


class ClusterLimiter:
    """The actor behind every worker's :class:`LeasedLimiter` (one per job, named after it)."""

    def __init__(self, rpm: float | None, tpm: float | None, first_run: int) -> None:
        self._limiter = Limiter(rpm, tpm, target_utilization=_CLUSTER_UTILIZATION)
        self._held: dict[int, Reservation] = {}
        self._next_id = 0
        self._next_run = first_run
        self._fatal: str | None = None
        self.rate_limited = 0

    def run_number(self) -> int:
        """A run number for one worker's part files: never the same twice in a job."""
        run = self._next_run
        self._next_run += 1
        return run

    async def lease(self, wanted: int, tokens: int, reports: list[Report]) -> tuple[list[int], str | None]:
        """Up to ``wanted`` admissions of ``tokens`` each, at the limiter's pace; and the stop, if any."""
        self.report(reports)
        ids: list[int] = []
        size = min(wanted, _LEASE_FREE if self._limiter.free else _LEASE_LIMITED)
        for _ in range(max(1, size)):
            if self._fatal is not None:
                break
            reservation = await self._limiter.acquire(tokens)
            self._next_id += 1
            self._held[self._next_id] = reservation
            ids.append(self._next_id)
        return ids, self._fatal

    def report(self, reports: list[Report]) -> str | None:
        """What happened to leased admissions; returns the stop, if any."""
        limiter = self._limiter
        for rid, what, headers, tokens in reports:
            reservation = self._held.pop(rid, None)
            if reservation is None:
                continue
            if what == "ok":
                limiter.on_response(headers or {}, reservation)
                limiter.settle(reservation, tokens)
            elif what == "429":
                self.rate_limited += 1
                limiter.on_rate_limited(headers or {}, reservation)
            elif what == "gone":
                limiter.release(reservation)
            else:
                limiter.settle(reservation, None)
        return self._fatal

    def stop(self, message: str) -> None:
        """A fatal answer somewhere: every worker stops at its next lease or report."""
        if self._fatal is None:
            self._fatal = message

    def fatal(self) -> str | None:
        return self._fatal

    def stats(self) -> dict[str, Any]:
        s = self._limiter.stats
        return {"requests": s.requests, "rate_limited": self.rate_limited, "pauses": s.pauses,
                "paused_s": s.paused_s, "held": len(self._held)}


class LeasedLimiter(Limiter):
    """A worker's limiter: admissions leased from the job's :class:`ClusterLimiter` actor.

    Made for one block (one event loop); :meth:`close` gives back what was not used.
    ``on_stop`` is called with the job's stop message when the actor has one.
    """

    def __init__(self, actor: Any, wanted: int, on_stop: Callable[[str], None]) -> None:
        super().__init__()  # unlimited: the actor holds the limits
        self._actor = actor
        self._wanted = max(1, wanted)
        self._on_stop = on_stop
        self._granted: list[int] = []
        self._reports: list[Report] = []
        self._headers_of: dict[int, dict[str, str]] = {}  # an answer's headers, until it is settled
        self._lock = anyio.Lock()

    async def acquire(self, tokens: int) -> Reservation:
        while not self._granted:
            async with self._lock:
                if self._granted:
                    break
                reports, self._reports = self._reports, []
                ids, stop = await self._actor.lease.remote(self._wanted, tokens, reports)
                self._granted.extend(ids)
                if stop is not None:
                    self._on_stop(stop)
                    await anyio.sleep_forever()  # the stop cancels this worker
        return Reservation(tokens, seq=self._granted.pop())

    def _note(self, reservation: Reservation, what: str, headers: Mapping[str, str] | None,
              tokens: int | None) -> None:
        if reservation.done:
            return
        reservation.done = True
        self._reports.append((reservation.seq, what, dict(headers) if headers else None, tokens))

    def settle(self, reservation: Reservation, actual_tokens: int | None) -> None:
        headers = self._headers_of.pop(reservation.seq, None)
        answered = headers is not None or actual_tokens is not None
        self._note(reservation, "ok" if answered else "done", headers, actual_tokens)

    def release(self, reservation: Reservation) -> None:
        self._headers_of.pop(reservation.seq, None)
        self._note(reservation, "gone", None, None)

    def on_response(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        if reservation is not None:
            self._headers_of[reservation.seq] = dict(headers)

    def on_rate_limited(self, headers: Mapping[str, str] | None = None,
                        reservation: Reservation | None = None) -> float:
        if reservation is not None:
            self._note(reservation, "429", headers, None)
        self.flush_reports()  # every worker should pause with the first 429
        asked = retry_after(headers) if headers else None
        return asked if asked is not None else 1.0

    @property
    def free(self) -> bool:
        return True  # the actor holds requests back, not this stand-in

    def blocked_for(self) -> float:
        return 0.0

    def flush_reports(self) -> None:
        """Send what happened so far, without waiting for the answer."""
        if self._reports:
            reports, self._reports = self._reports, []
            self._actor.report.remote(reports)

    async def report(self) -> str | None:
        """Send what happened so far and learn whether the job must stop."""
        reports, self._reports = self._reports, []
        stop: str | None = await self._actor.report.remote(reports)
        return stop

    async def close(self) -> None:
        """Give back the admissions not used and report the rest."""
        self._reports.extend((rid, "gone", None, None) for rid in self._granted)
        self._granted.clear()
        await self.report()

"""One limiter for the cluster: a named actor per job, and the worker's lease of it.

:class:`ClusterLimiter` runs as one named Ray actor per job (see
:mod:`batch.engines.ray_engine`). For each target (lane) of the job it holds
promptmill's own :class:`~batch.limiter.Limiter` (the RPM/TPM pace, the
``x-ratelimit-*`` headers, the adaptive state learned from 429s); for the job it
holds the money (a :class:`~batch.budget.Ledger` with the budget, when there is
one), the stops (the whole job's, or one target's), the run numbers that keep
the workers' part files apart, and the rows done, for the driver's progress.

A worker does not ask it once a request: :class:`LeasedLimiter` (the worker's
stand-in for a :class:`~batch.limiter.Limiter`) takes a small *lease* of
admissions at a time and sends what happened to them (answers, headers, 429s,
token counts) back in batches, with its next lease or its regular report. The
actor admits the leased requests through its limiter one by one, at the
limiter's pace, so the cluster as a whole keeps to the limits; a lease is held
at most by a few requests, so the burst it can make is small. A 429 is
reported at once, so every worker pauses with the first one.

Every worker reports a few times a second. A worker not heard from for
``_SILENT_S`` (its process was killed) loses what it held: its admissions are
given back and its budget reservations count as spent at their worst case
(their answers may have been paid), so the others are never held up by it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from batch.budget import Hold
from batch.engines.ray_money import MoneyArgs, Settle
from batch.limiter import Limiter, Reservation
from batch.ratelimits import retry_after

__all__ = ["ClusterLimiter", "LeasedLimiter", "Report", "State"]

log = logging.getLogger(__name__)

# A report: (reservation id, what happened, headers, tokens charged).
# what: "ok" (an answer), "done" (an error answer: keep the estimate), "gone" (no answer: refund), "429".
Report = tuple[int, str, dict[str, str] | None, int | None]
# What a worker learns with every lease and report: the job's stop, the targets stopped
# (lane: (message, HTTP status, error code, the target's line)), the budget's variants closed,
# and whether the driver asked to stop after the requests in flight (a signal).
State = tuple[str | None, dict[int, tuple[str, int | None, str | None, str]], list[str], bool]

_LEASE_LIMITED = 2  # admissions a lease takes when a limit paces requests: a small burst
_LEASE_FREE = 64  # when nothing limits them: few round trips
# The share of a given limit the cluster paces to: below one machine's 0.98, for the leases'
# small bursts and the spread of the hops between the actor, the workers and the server.
_CLUSTER_UTILIZATION = 0.93
_SILENT_S = 20.0  # a worker holding admissions that has not reported for this long is gone


class ClusterLimiter:
    """The actor behind every worker's :class:`LeasedLimiter` (one per job, named after it)."""

    def __init__(self, lanes: list[tuple[float | None, float | None]], first_run: int, money: MoneyArgs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limiters = [Limiter(rpm, tpm, target_utilization=_CLUSTER_UTILIZATION) for rpm, tpm in lanes]
        self._held: dict[int, tuple[int, int, Reservation]] = {}  # id: (worker, lane, reservation)
        self._next_id = 0
        self._next_run = first_run
        self._fatal: str | None = None
        self._fatal_code = 3
        self._lanes_stopped: dict[int, tuple[str, int | None, str | None, str]] = {}
        self._draining = False
        self._ledger = money.ledger()
        self._holds: dict[int, tuple[int, Hold]] = {}  # hold id: (worker, hold)
        self._clock = clock
        self._heard: dict[int, float] = {}  # worker: when it last reported
        self._next_check = 0.0
        self.rate_limited = 0
        self.workers_lost = 0
        # rows done in this run (for the driver's progress): done, failed, tokens, skipped; and their cost
        self._rows = [0, 0, 0, 0]
        self._cost = 0.0

    def run_number(self) -> int:
        """A run number for one worker (its part files, its name here): never the same twice in a job."""
        run = self._next_run
        self._next_run += 1
        self._heard[run] = self._clock()
        return run

    # -- requests ------------------------------------------------------------

    async def lease(self, worker: int, lane: int, wanted: int, tokens: int, reports: list[Report]) -> tuple[list[int], State]:
        """Up to ``wanted`` admissions of ``tokens`` each on ``lane``, at its limiter's pace; and the job's state."""
        self._heard_from(worker)
        self._reported(reports)
        limiter = self._limiters[lane]
        ids: list[int] = []
        size = min(wanted, _LEASE_FREE if limiter.free else _LEASE_LIMITED)
        for _ in range(max(1, size)):
            if self._fatal is not None or lane in self._lanes_stopped:
                break
            reservation = await limiter.acquire(tokens)
            self._next_id += 1
            self._held[self._next_id] = (worker, lane, reservation)
            ids.append(self._next_id)
        return ids, self.state()

    def report(self, worker: int, reports: list[Report], rows: list[int] | None = None, cost: float = 0.0,
               settles: list[Settle] | None = None) -> State:
        """What happened to leased admissions, the budget reservations settled, and the rows a worker
        finished since its last report."""
        self._heard_from(worker)
        self._reported(reports)
        if settles:
            self.settle(worker, settles)
        if rows:
            for i, n in enumerate(rows):
                self._rows[i] += n
            self._cost += cost
        return self.state()

    def _reported(self, reports: list[Report]) -> None:
        for rid, what, headers, tokens in reports:
            held = self._held.pop(rid, None)
            if held is None:
                continue
            limiter, reservation = self._limiters[held[1]], held[2]
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

    # -- money ---------------------------------------------------------------

    async def reserve(self, worker: int, variant: str, usd: float, settles: list[Settle]) -> int | None:
        """Reserve one row's worst case (see :class:`batch.budget.Ledger`); None: the budget is reached."""
        self._heard_from(worker)
        self.settle(worker, settles)
        hold = await self._ledger.reserve(variant, usd)
        if hold is None:
            return None
        self._next_id += 1
        self._holds[self._next_id] = (worker, hold)
        return self._next_id

    def settle(self, worker: int, settles: list[Settle]) -> None:
        """Rows' answers: their real cost (None: no usage, counted at the reservation), or ``release``: nothing paid."""
        for hid, usd, release in settles:
            held = self._holds.pop(hid, None)
            if held is None:
                continue
            if release:
                self._ledger.release(held[1])
            else:
                self._ledger.settle(held[1], usd)

    def money(self) -> tuple[dict[str, object], bool, str]:
        """The budget's figures for the summary, whether it was reached, and the stop line."""
        ledger = self._ledger
        return ledger.as_dict(), ledger.reached, ledger.stop_text() if ledger.reached else ""

    # -- stops and the workers -----------------------------------------------

    def stop(self, message: str, code: int = 3) -> None:
        """A fatal answer somewhere (or another stop, with its exit code): every worker stops at its
        next lease or report."""
        if self._fatal is None:
            self._fatal, self._fatal_code = message, code

    def stopped(self) -> tuple[str | None, int, dict[int, str]]:
        """The job's stop and its exit code, and each target stopped with its line (for the driver)."""
        return self._fatal, self._fatal_code, {lane: why[3] for lane, why in self._lanes_stopped.items()}

    def drain(self) -> None:
        """The driver got a signal: workers send nothing more, finish their requests in flight and
        hand their blocks back."""
        self._draining = True

    def stop_lane(self, lane: int, why: tuple[str, int | None, str | None, str]) -> None:
        """A fatal answer from one target: its variants stop on every worker, the others go on."""
        self._lanes_stopped.setdefault(lane, why)

    def state(self) -> State:
        closed = [name for name, pool in self._ledger.pools.items() if pool.closed]
        return self._fatal, dict(self._lanes_stopped), closed, self._draining

    def _heard_from(self, worker: int) -> None:
        now = self._clock()
        self._heard[worker] = now
        if now >= self._next_check:
            self._next_check = now + 1.0
            self._drop_silent(now)

    def _drop_silent(self, now: float) -> None:
        """Give back what workers gone silent held (killed mid-block): see the module docstring."""
        silent = {w for w, t in self._heard.items() if now - t > _SILENT_S}
        if not silent:
            return
        lost = {w for w, _, _ in self._held.values() if w in silent} | {w for w, _ in self._holds.values() if w in silent}
        for rid in [rid for rid, (w, _, _) in self._held.items() if w in silent]:
            _, lane, reservation = self._held.pop(rid)
            self._limiters[lane].release(reservation)
        for hid in [hid for hid, (w, _) in self._holds.items() if w in silent]:
            self._ledger.lost(self._holds.pop(hid)[1])
        for w in silent:
            del self._heard[w]
        if lost:
            self.workers_lost += len(lost)
            log.warning("%d worker(s) silent for %.0f s: what they held is given back", len(lost), _SILENT_S)

    def progress(self) -> dict[str, Any]:
        """Rows done in this run and the money so far, for the driver's progress."""
        ledger = self._ledger
        spent = ledger.spent if ledger.limit is not None else ledger.spent + self._cost
        done, failed, tokens, skipped = self._rows
        return {"done": done, "failed": failed, "tokens": tokens, "skipped": skipped, "spent": spent,
                "reserved": ledger.reserved, "limit": ledger.limit}

    def stats(self) -> dict[str, Any]:
        requests = sum(limiter.stats.requests for limiter in self._limiters)
        return {"requests": requests, "rate_limited": self.rate_limited, "held": len(self._held),
                "workers_lost": self.workers_lost}


class LeasedLimiter(Limiter):
    """A worker's limiter for one lane: admissions leased from the job's :class:`ClusterLimiter` actor.

    Made for one block (one event loop); :meth:`close` gives back what was not used.
    ``on_state`` is called with what the actor says of the job (its stops) at every lease.
    """

    def __init__(self, actor: Any, worker: int, lane: int, wanted: int, on_state: Callable[[State], None]) -> None:
        super().__init__()  # unlimited: the actor holds the limits
        self._actor = actor
        self._worker = worker
        self._lane = lane
        self._wanted = max(1, wanted)
        self._on_state = on_state
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
                ids, state = await self._actor.lease.remote(self._worker, self._lane, self._wanted, tokens, reports)
                self._granted.extend(ids)
                self._on_state(state)
                if not ids:
                    await anyio.sleep_forever()  # stopped: the stop cancels this worker
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

    def take_reports(self) -> list[Report]:
        reports, self._reports = self._reports, []
        return reports

    def flush_reports(self) -> None:
        """Send what happened so far, without waiting for the answer."""
        if self._reports:
            self._actor.report.remote(self._worker, self.take_reports())

    def give_back(self) -> None:
        """The admissions not used, as reports that they are gone."""
        self._reports.extend((rid, "gone", None, None) for rid in self._granted)
        self._granted.clear()

"""The one :class:`Limiter` a job's workers share: three policies, the strictest wins.

A worker calls :meth:`Limiter.acquire` with the request's estimated tokens
(``batch.tokens.estimate_tokens``) before it sends, and reports what came back:

    res = await limiter.acquire(estimate_tokens(body))
    2xx            -> limiter.on_response(reply.headers, res); limiter.settle(res, charged)
    429 (not quota)-> limiter.on_rate_limited(exc.headers, res)      (refunds res)
    no answer      -> limiter.release(res)                            (connect error: refund)
    other answer   -> limiter.settle(res, None)                       (keep the estimate)

Every reservation is finished exactly once; finishing it again is a no-op, so a
worker may call ``release`` in a ``finally`` after ``settle`` without harm.

The policies, each in its own module:

- configured ``rpm`` / ``tpm``, paced, not bursted (:mod:`batch.limiter.pace`);
- ``x-ratelimit-*`` headers: their limits paced the same way, their remaining
  budget a gate until its reset (:mod:`batch.limiter.headers`);
- bare 429s: block, probe, learn a rate (:mod:`batch.limiter.adaptive`).

A 429 pauses every worker: for its ``Retry-After``, else the exhausted header
budget's reset, else what the adaptive rate says (1 s when it is off).

Time is injected: ``clock`` and ``sleep``, so a minute of limiting runs in
milliseconds under test. All state is touched from one event loop; no locks.

Waiting is a FIFO: only the head waiter sleeps (until its own start time,
re-checked at least every second so rate changes apply to it), and hands over
to the next waiter when it goes. Thousands of waiters cost one timer. With no
limit of any kind known, ``acquire`` takes a fast path that neither sleeps
nor reads the clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

from batch.limiter.adaptive import PAUSE_S, AdaptiveRate
from batch.limiter.headers import HeaderBudget
from batch.limiter.pace import Pace
from batch.ratelimits import has_rate_headers, retry_after

__all__ = ["Limiter", "LimiterStats", "Reservation"]

logger = logging.getLogger(__name__)

# Pacing tolerance: how early a request may start against its slot. Without it
# every admission at rates above ~1000/s would cost a timer tick of ~1 ms.
_TOLERANCE_S = 0.005
# Longest single nap of the head waiter, so rate changes reach it promptly.
_NAP_S = 1.0


@dataclass(slots=True, eq=False)
class Reservation:
    """What one admitted request holds against the limits until it is finished."""

    tokens: int
    seq: int = 0  # admission order; answers to later requests carry fresher headers
    tokens_before: int = 0  # tokens admitted before this request
    done: bool = False


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot for the summary and benchmarks. Rates are per minute; ``None`` = unpaced."""

    requests: int
    tokens_reserved: int
    tokens_refunded: int
    rate_limited: int
    pauses: int
    paused_s: float
    waiting: int
    in_flight: int
    rpm: float | None  # the request pace in force now
    tpm: float | None  # the token pace in force now
    adaptive_rpm: float | None  # the rate learned from bare 429s
    header_rpm: float | None  # limits learned from x-ratelimit-* headers
    header_tpm: float | None


class Limiter:
    """Request and token rate limits shared by every worker of a job (see the module docstring)."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        adaptive: bool = True,
        target_utilization: float = 0.98,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self._pace = Pace(target_utilization)
        self._rpm = [] if rpm is None else [(rpm, 60.0)]
        self._tpm = [] if tpm is None else [(tpm, 60.0)]
        self._headers = HeaderBudget()
        self._adaptive = AdaptiveRate() if adaptive else None
        self._clock = clock
        self._sleep = sleep
        self._paused_until = -math.inf
        self._free = True  # no limit of any kind: the fast path

        # admissions
        self._seq = 0
        self._tokens_total = 0
        self._in_flight = 0
        self._waiters: deque[anyio.Event] = deque()
        self._bound_at = -math.inf  # last time a waiter had to wait for the pace

        # statistics
        self._tokens_refunded = 0
        self._rate_limited = 0
        self._pauses = 0
        self._paused_s = 0.0

        self._recompute(-math.inf)

    # ------------------------------------------------------------------ admission

    async def acquire(self, tokens: int) -> Reservation:
        """Wait until a request of ``tokens`` estimated tokens may be sent; FIFO among waiters."""
        if self._free and not self._waiters:
            return self._book(tokens)  # no limit: no clock, no pacing
        event = anyio.Event()
        self._waiters.append(event)
        try:
            if self._waiters[0] is not event:
                await event.wait()
            while True:
                now = self._clock()
                delay = self._delay(now, tokens)
                if delay <= _TOLERANCE_S:
                    return self._take(now, tokens)
                self._bound_at = now
                await self._sleep(min(delay, _NAP_S))
        finally:
            if self._waiters and self._waiters[0] is event:
                self._waiters.popleft()
                if self._waiters:
                    self._waiters[0].set()
            else:  # cancelled while queued: only its own ``finally`` removes an event
                self._waiters.remove(event)

    def _delay(self, now: float, tokens: int) -> float:
        start = self._pace.start(self._paused_until)
        return max(start, self._headers.hold_until(now, tokens)) - now

    def _book(self, tokens: int) -> Reservation:
        """Count one request of ``tokens`` in flight; what every reservation does, limited or not."""
        self._seq += 1
        res = Reservation(tokens, self._seq, self._tokens_total)
        self._tokens_total += tokens
        self._in_flight += 1
        self._pace.grows(tokens)
        return res

    def _take(self, now: float, tokens: int) -> Reservation:
        grew = tokens > self._pace.max_tokens
        res = self._book(tokens)
        if grew and self._pace.token_rate:
            self._recompute(now)
        self._pace.take(now, tokens)
        self._headers.spend(tokens)
        if not self._pace.active:
            self._update_free(now)
        return res

    def settle(self, reservation: Reservation, actual_tokens: int | None) -> None:
        """Finish a reservation once the answer is in.

        ``actual_tokens`` is what the server counts against its token limit for
        this request; the difference from the estimate is given back (or, if the
        estimate was low, charged). ``None`` keeps the estimate. OpenAI and the
        built-in simulator count ``prompt_tokens + max_tokens * n`` at admission,
        so pass that to stay clear of their 429s; to budget by tokens actually
        used, pass ``usage.total_tokens``.
        """
        if reservation.done:
            return
        reservation.done = True
        self._in_flight -= 1
        if actual_tokens is None:
            return
        self._adjust_tokens(reservation.tokens - actual_tokens)

    def release(self, reservation: Reservation) -> None:
        """Finish a reservation for a request the server never took: give all of it back."""
        if reservation.done:
            return
        reservation.done = True
        self._in_flight -= 1
        self._pace.give_back_request()
        self._adjust_tokens(reservation.tokens)

    def _adjust_tokens(self, refund: int) -> None:
        if refund > 0:
            self._tokens_refunded += refund
        self._pace.adjust_tokens(refund, self._clock)

    @property
    def free(self) -> bool:
        """No limit, pause or budget of any kind holds requests back now (the fast path)."""
        return self._free

    def blocked_for(self) -> float:
        """Seconds until the server lets requests go again: a pause it asked for (a 429's
        Retry-After or reset) or the reset of a budget its headers say is spent; 0 if none."""
        if self._free:
            return 0.0
        now = self._clock()
        until = max(self._paused_until, self._headers.hold_until(now, 1))
        return max(0.0, until - now)

    # ------------------------------------------------------------------ feedback

    def on_response(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        """A 2xx answer: follow its ``x-ratelimit-*`` headers, and let an adaptive rate learn.

        Passing the answer's reservation lets the limiter tell how many requests
        were sent after the one the headers describe, and whether a success
        answers a request sent before or after the server started refusing.
        """
        has_headers = has_rate_headers(headers)
        if self._adaptive is None and self._free and not has_headers:
            return
        now = self._clock()
        if self._adaptive is not None:
            seq = reservation.seq if reservation is not None else None
            if self._adaptive.on_success(now, seq, self._bound_at):
                self._recompute(now)
        if has_headers:
            self._apply_headers(headers, now, reservation)

    def on_rate_limited(
        self, headers: Mapping[str, str], reservation: Reservation | None = None
    ) -> float:
        """A 429 that is not a spent quota: pause every worker and slow down.

        The reservation, if given, is released (the server did not take the
        request). Returns the seconds from now until workers may send again.
        """
        now = self._clock()
        self._rate_limited += 1
        if reservation is not None:
            self.release(reservation)
        has_limits = has_rate_headers(headers)
        if has_limits:
            self._apply_headers(headers, now, reservation)
        wait = retry_after(headers)
        adaptive = self._adaptive
        fresh = reservation is None or adaptive is None or adaptive.fresh(reservation.seq)
        if reservation is None and now < self._paused_until:
            fresh = False  # no way to tell; a 429 during a pause belongs to it
        if wait is None and has_limits:
            wait = self._headers.spent_wait(now)
        if not has_limits and adaptive is not None:
            adaptive_wait = self._adapt(now, adaptive) if fresh else max(0.0, self._paused_until - now)
            if wait is None:  # a Retry-After wins
                wait = adaptive_wait
        elif wait is None:
            if not fresh:
                return max(0.0, self._paused_until - now)
            wait = PAUSE_S
        self._pause(now, wait)
        return max(0.0, self._paused_until - now)

    def _adapt(self, now: float, adaptive: AdaptiveRate) -> float:
        """A fresh bare 429: the adaptive rate blocks, probes or cuts; the pace follows."""
        was_probing = adaptive.probing
        pause, changed = adaptive.on_refused(now, self._seq)
        if changed:
            self._recompute(now)
        if not was_probing:
            self._pace.hold(now)  # a cut or a block: no catching up on slots
        return pause

    def _pause(self, now: float, seconds: float) -> None:
        until = now + seconds
        if until <= self._paused_until:
            return
        self._pauses += 1
        self._paused_s += until - max(now, self._paused_until)
        self._paused_until = until
        self._free = False
        logger.debug("rate limited: every worker pauses %.2f s", seconds)

    def _apply_headers(
        self, headers: Mapping[str, str], now: float, reservation: Reservation | None
    ) -> None:
        seq = reservation.seq if reservation is not None else None
        sent_requests = self._seq - seq if seq is not None else self._in_flight
        if reservation is not None:
            sent_tokens = self._tokens_total - reservation.tokens_before - reservation.tokens
        else:
            sent_tokens = self._in_flight * self._pace.max_tokens
        if self._headers.apply(headers, now, seq, sent_requests, sent_tokens):
            self._recompute(now)

    # ------------------------------------------------------------------ pacing

    def _recompute(self, now: float) -> None:
        """Pace to the strictest limit known: configured, from headers, learned."""
        hdr = self._headers
        cap = self._adaptive.cap if self._adaptive is not None else None
        self._pace.follow(self._rpm + hdr.requests.limits(), self._tpm + hdr.tokens.limits(), cap)
        self._update_free(now)

    def _update_free(self, now: float) -> None:
        self._free = not (self._pace.active or self._headers.holding or self._paused_until > now)

    # ------------------------------------------------------------------ reporting

    @property
    def stats(self) -> LimiterStats:
        """Counters and the rates in force now."""
        pace, adaptive = self._pace, self._adaptive
        return LimiterStats(
            requests=self._seq,
            tokens_reserved=self._tokens_total,
            tokens_refunded=self._tokens_refunded,
            rate_limited=self._rate_limited,
            pauses=self._pauses,
            paused_s=self._paused_s,
            waiting=len(self._waiters),
            in_flight=self._in_flight,
            rpm=60.0 / pace.interval if pace.interval else None,
            tpm=60.0 * pace.token_rate if pace.token_rate else None,
            adaptive_rpm=None if adaptive is None else adaptive.per_minute,
            header_rpm=self._headers.requests.per_minute,
            header_tpm=self._headers.tokens.per_minute,
        )

"""Keep a job within its request and token rate limits, shared by every worker.

One :class:`Limiter` serves every task of a job. A worker calls
:meth:`Limiter.acquire` with the request's estimated tokens
(:func:`estimate_tokens`) before it sends, and reports what came back:

    res = await limiter.acquire(estimate_tokens(body))
    2xx            -> limiter.on_response(reply.headers, res); limiter.settle(res, charged)
    429 (not quota)-> limiter.on_rate_limited(exc.headers, res)      (refunds res)
    no answer      -> limiter.release(res)                            (connect error: refund)
    other answer   -> limiter.settle(res, None)                       (keep the estimate)

Every reservation is finished exactly once; finishing it again is a no-op, so a
worker may call ``release`` in a ``finally`` after ``settle`` without harm.

Three sources of limits combine; the strictest wins at any moment.

Configured ``rpm`` / ``tpm``
    Paced, not bursted. A token bucket that starts full lets through a whole
    window's worth at once and then keeps going at the full rate, which a
    sliding-window server answers with 429s. So each limit is a bucket of
    (almost) no capacity: request *i* may start once request *i-1* has paid for
    itself (``1/rate`` seconds for a request, ``tokens/rate`` for its tokens),
    with a few milliseconds of tolerance so the event loop's timer resolution
    does not cap throughput. Pacing at ``target_utilization`` (0.98) of the
    limit keeps any 60 s window at most ``0.98 * limit + one request`` and
    leaves room for latency jitter; for tokens, the pace is also lowered by the
    largest single reservation so that even that extra request fits. Time the
    pace would lose is kept: up to 15 ms of a waiter's lateness (a timer firing
    late on a busy loop), tokens given back by ``settle`` while the head waiter
    sleeps, and, when both paces hold and the limit leaves room for it, one
    request slot left unused while a large request waited for tokens.

``x-ratelimit-*`` headers (OpenAI, gateways)
    ``x-ratelimit-limit-requests`` / ``-tokens`` give the limit; the window is
    taken as the longest ``x-ratelimit-reset-*`` seen (a fresh window resets in
    a full window), 60 s until then. The job paces to that limit as above.
    ``remaining`` and ``reset`` add a gate: the remaining budget, minus what was
    sent since the answer that reported it, may be spent before ``reset``;
    once spent, everyone waits for the reset. A 429 with headers pauses
    everyone for ``Retry-After`` (or the exhausted limit's reset).

Bare 429s (Atoma: no headers, 429 for quota and overload alike)
    Learned from the first gap, then paced. Until the first 429 nothing is
    paced, so a sliding-window server takes a whole window's worth at once and
    then refuses everything until that burst's first request leaves its window.
    The first 429 blocks every worker and the job probes: one request every
    half of the time the accepted burst took (0.05 to 0.5 s; 0.5 s if nothing
    was accepted), and again that long after each failed probe, so the reopening
    is found well within the burst's length and the stall stays under a
    window. Failed probes do not lower anything. The first success of a request
    sent after the block ends it: the time from the first success of the
    burst to this one is the server's window W (an upper bound, by at most a
    probe interval and a latency), the burst's successes its limit N, and from then on
    requests are paced at 0.97 N / W. A 429 while paced cuts the rate to 0.95
    of itself and pauses two request intervals (the window frees again that
    soon); 429s for requests sent before the cut belong to it. A second fresh
    429 with no success in between means the server refuses everything (an
    outage, or a limit far below the pace): the job probes again, at W / 20
    (0.05 to 0.5 s). Once any block lasts longer than a window (60 s until one
    is learned) the probe interval stretches to a tenth of the excess, at most
    4 s, so a long outage costs few 429s yet never stalls; when the server
    accepts again, the job carries on at the pace it had. A block before any success
    teaches nothing: the job starts over unpaced. While workers are waiting on
    the pace, the rate grows by 1 % a learned window (60 s until one is
    learned), so a low estimate recovers and a limit that rises is found.

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
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from batch.retry import retry_after

__all__ = [
    "Limiter",
    "LimiterStats",
    "Reservation",
    "answer_tokens",
    "content_chars",
    "estimate_tokens",
    "parse_duration",
    "prompt_tokens",
    "tokens_for",
]

logger = logging.getLogger(__name__)

# Pacing tolerance: how early a request may start against its slot. Without it
# every admission at rates above ~1000/s would cost a timer tick of ~1 ms.
_TOLERANCE_S = 0.005
# Lateness a waiter may make up: a timer that fires a little late (a busy event
# loop, timer resolution) would otherwise cost its slot that time, every slot.
_LATE_S = 0.015
# Longest single nap of the head waiter, so rate changes reach it promptly.
_NAP_S = 1.0
# Default window of a limit until a reset header says otherwise (per-minute limits).
_DEFAULT_WINDOW_S = 60.0
# Adaptive (bare 429) tuning; see the module docstring.
_PACE_SHARE = 0.97  # pace at this share of the learned limit / window
_CUT = 0.95  # a 429 while paced: the rate falls to this share
_GROWTH_PER_WINDOW = 0.01  # while workers wait on the pace, the rate grows this much a window
_PAUSE_S = 1.0  # pause after a bare 429 when not adapting
_SHORT_PAUSE_SLOTS = 2.0  # pause after a 429 while paced, in request intervals
_MIN_PROBE_S = 0.05
_FIRST_PROBE_S = 0.5  # longest probe interval while a window may be about to free
_MAX_PROBE_S = 4.0  # longest probe interval in a long outage

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)?")

_RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset duration ("1s", "6m0s", "20ms", "1h2m3.5s", "1.5").

    A bare number is seconds. Anything unparseable gives ``None``.
    """
    text = text.strip()
    if not text:
        return None
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        unit = match.group(2)
        if unit is None and (pos != 0 or match.end() != len(text)):
            return None
        total += float(match.group(1)) * units[unit or "s"]
        pos = match.end()
    return total


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _duration(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    return None if value is None else parse_duration(value)


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a request may use: :func:`prompt_tokens` plus :func:`answer_tokens`."""
    return prompt_tokens(body) + answer_tokens(body)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt's tokens, estimated from its text (no tokenizer is downloaded).

    A character count divided by four, plus four tokens per chat message and
    three for the reply's priming: this over-estimates English slightly.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = 0
        for message in messages:
            if isinstance(message, Mapping):
                chars += content_chars(message.get("content"))
                name = message.get("name")
                if isinstance(name, str):
                    chars += len(name)
        return tokens_for(chars, len(messages))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return tokens_for(sum(len(p) for p in prompt if isinstance(p, str)), 0)
    return tokens_for(len(prompt) if isinstance(prompt, str) else 0, 0)


def tokens_for(chars: int, messages: int) -> int:
    """The estimate for ``chars`` characters of text in ``messages`` chat messages (0: a plain prompt)."""
    return -(-chars // 4) + (3 + 4 * messages if messages else 0)


def answer_tokens(body: Mapping[str, Any]) -> int:
    """``max_tokens * n``: what a server reserves for the answer at admission.

    A body with no ``max_tokens`` (or ``max_completion_tokens``) is counted with
    8192, what Atoma reserves for it.
    """
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        max_tokens = 8192
    n = body.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        n = 1
    return max_tokens * n


def content_chars(content: Any) -> int:
    """Characters of a message's content: a string, or a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                # an image or audio part: a rough flat cost rather than nothing
                total += len(text) if isinstance(text, str) else 340
            elif isinstance(part, str):
                total += len(part)
        return total
    return 0


@dataclass(slots=True, eq=False)
class Reservation:
    """What one admitted request holds against the limits until it is finished."""

    tokens: int
    seq: int = 0  # admission order; answers to later requests carry fresher headers
    tokens_before: int = 0  # tokens admitted before this request
    done: bool = False


@dataclass(slots=True)
class _HeaderLimit:
    """What a server's ``x-ratelimit-*-requests`` (or ``-tokens``) headers said."""

    kind: str  # "requests" or "tokens"
    limit: float | None = None
    window: float = 0.0
    budget: float | None = None  # remaining until reset_at
    reset_at: float = -math.inf
    budget_seq: int = -1  # the request whose answer the budget came from

    def apply(self, headers: Mapping[str, str], now: float, seq: int | None, sent_since: float) -> bool:
        """Follow one answer's headers; whether anything changed. ``sent_since`` is what
        was sent after the request ``seq`` the answer belongs to (in this kind's units)."""
        changed = False
        limit = _number(headers, f"x-ratelimit-limit-{self.kind}")
        reset = _duration(headers, f"x-ratelimit-reset-{self.kind}")
        if limit is not None and limit > 0:
            window = max(self.window, reset or 0.0) or _DEFAULT_WINDOW_S
            if limit != self.limit or window != self.window:
                self.limit, self.window = limit, window
                changed = True
        remaining = _number(headers, f"x-ratelimit-remaining-{self.kind}")
        if remaining is not None and reset is not None and self._fresher(seq):
            self.budget = remaining - sent_since
            self.reset_at = now + reset
            changed = True
        return changed

    def hold_until(self, now: float, need: float) -> float:
        """When a request needing ``need`` of the budget may go: its reset when the budget
        is short, else -inf. A budget past its reset is dropped."""
        if self.budget is None:
            return -math.inf
        if now >= self.reset_at:
            self.budget = None
            return -math.inf
        return self.reset_at if self.budget < need else -math.inf

    def spend(self, amount: float) -> None:
        if self.budget is not None:
            self.budget -= amount

    def _fresher(self, seq: int | None) -> bool:
        """Whether an answer to request ``seq`` is newer than the one the budget came from."""
        if seq is None:
            return True
        if seq < self.budget_seq:
            return False
        self.budget_seq = seq
        return True


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
        if not 0 < target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        self._rpm = rpm
        self._tpm = tpm
        self._clock = clock
        self._sleep = sleep
        self._adaptive = adaptive
        self._util = target_utilization

        # pacing: the earliest start of the next request / of the next token spend
        self._req_interval = 0.0  # seconds per request, 0 = unpaced
        self._req_bank = 0.0  # request slots the pace may lag by and catch up (see _recompute)
        self._tok_rate = 0.0  # tokens per second, 0 = unpaced
        self._next_req = -math.inf
        self._next_tok = -math.inf
        self._tok_credit = 0.0  # seconds of token pace given back since the last admission
        self._max_tokens = 0  # largest single reservation seen
        self._paused_until = -math.inf
        self._free = True  # no limit of any kind: the fast path

        # admissions
        self._seq = 0
        self._tokens_total = 0
        self._in_flight = 0
        self._waiters: deque[anyio.Event] = deque()
        self._bound_at = -math.inf  # last time a waiter had to wait for the pace

        # limits learned from headers
        self._hdr_req = _HeaderLimit("requests")
        self._hdr_tok = _HeaderLimit("tokens")

        # adaptive rate (requests per second), learned from bare 429s
        self._rate: float | None = None  # the learned pace; None = unpaced
        self._window: float | None = None  # the server's window, learned from the first gap
        self._streak = 0  # fresh 429s since the last success
        self._cut_seq = 0  # requests admitted before a cut or a block answer to it
        self._grown_at = 0.0
        self._probing = False  # blocked: one probe request per ``_probe_s``
        self._probe_s = _MAX_PROBE_S
        self._probe_base = _MAX_PROBE_S
        self._blocked_at = 0.0
        self._epoch_first: float | None = None  # first success of the unpaced start (answer time)
        self._epoch_last = 0.0
        self._epoch_ok = 0

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
        start = self._paused_until
        if self._req_interval and self._next_req > start:
            start = self._next_req
        if self._tok_rate and self._next_tok > start:
            start = self._next_tok
        start = max(start, self._hdr_req.hold_until(now, 1), self._hdr_tok.hold_until(now, tokens))
        return start - now

    def _book(self, tokens: int) -> Reservation:
        """Count one request of ``tokens`` in flight; what every reservation does, limited or not."""
        self._seq += 1
        res = Reservation(tokens, self._seq, self._tokens_total)
        self._tokens_total += tokens
        self._in_flight += 1
        if tokens > self._max_tokens:
            self._max_tokens = tokens
        return res

    def _take(self, now: float, tokens: int) -> Reservation:
        grew = tokens > self._max_tokens
        res = self._book(tokens)
        if grew and self._tok_rate:
            self._recompute(now)
        if self._req_interval:
            base = max(self._next_req, now - max(_LATE_S, self._req_bank * self._req_interval))
            self._next_req = base + self._req_interval
        if self._tok_rate:
            # Refunds arrive while the head waiter sleeps to its start time; it wakes
            # after the (now earlier) slot, and that lateness must not be lost.
            self._next_tok = max(self._next_tok, now - _LATE_S - self._tok_credit) + tokens / self._tok_rate
            self._tok_credit = 0.0
        self._hdr_req.spend(1)
        self._hdr_tok.spend(tokens)
        if not (self._req_interval or self._tok_rate):
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
        if self._req_interval:
            self._next_req -= self._req_interval
        self._adjust_tokens(reservation.tokens)

    def _adjust_tokens(self, refund: int) -> None:
        if refund > 0:
            self._tokens_refunded += refund
        if refund and self._tok_rate:
            if refund < 0:  # under-estimated: the overrun is spent from now on at the latest
                self._next_tok = max(self._next_tok, self._clock())
            self._next_tok -= refund / self._tok_rate
            if refund > 0:
                # at most one largest request's worth, so no burst builds up while idle
                cap = self._max_tokens / self._tok_rate
                self._tok_credit = min(cap, self._tok_credit + refund / self._tok_rate)

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
        until = max(self._paused_until, self._hdr_req.hold_until(now, 1), self._hdr_tok.hold_until(now, 1))
        return max(0.0, until - now)

    # ------------------------------------------------------------------ feedback

    def on_response(self, headers: Mapping[str, str], reservation: Reservation | None = None) -> None:
        """A 2xx answer: follow its ``x-ratelimit-*`` headers, and let an adaptive rate learn.

        Passing the answer's reservation lets the limiter tell how many requests
        were sent after the one the headers describe, and whether a success
        answers a request sent before or after the server started refusing.
        """
        has_headers = _has_rate_headers(headers)
        if not self._adaptive and self._free and not has_headers:
            return
        now = self._clock()
        if self._adaptive:
            fresh = reservation is None or reservation.seq > self._cut_seq
            if self._rate is None and (fresh or self._probing):
                self._count_success(now, fresh and self._probing)
            if fresh:
                self._streak = 0
                if self._probing:
                    self._reopen(now)
                elif self._rate is not None:
                    self._grow(now)
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
        has_limits = _has_rate_headers(headers)
        if has_limits:
            self._apply_headers(headers, now, reservation)
        wait = retry_after(headers)
        fresh = reservation is None or reservation.seq > self._cut_seq
        if reservation is None and now < self._paused_until:
            fresh = False  # no way to tell; a 429 during a pause belongs to it
        if wait is None and has_limits:
            resets = []
            if self._hdr_req.budget is not None and self._hdr_req.budget < 1:
                resets.append(self._hdr_req.reset_at - now)
            if self._hdr_tok.budget is not None and self._hdr_tok.budget <= 0:
                resets.append(self._hdr_tok.reset_at - now)
            wait = max(resets) if resets else None
        if not has_limits and self._adaptive:
            adaptive_wait = self._adapt(now) if fresh else max(0.0, self._paused_until - now)
            if wait is None:  # a Retry-After wins
                wait = adaptive_wait
        elif wait is None:
            if not fresh:
                return max(0.0, self._paused_until - now)
            wait = _PAUSE_S
        self._pause(now, wait)
        return max(0.0, self._paused_until - now)

    def _pause(self, now: float, seconds: float) -> None:
        until = now + seconds
        if until <= self._paused_until:
            return
        self._pauses += 1
        self._paused_s += until - max(now, self._paused_until)
        self._paused_until = until
        self._free = False
        logger.debug("rate limited: every worker pauses %.2f s", seconds)

    # ------------------------------------------------------------------ adaptive rate

    def _count_success(self, now: float, reopening: bool) -> None:
        """A success of the unpaced start (or of its tail, answered late)."""
        if reopening:
            return
        if self._epoch_first is None:
            self._epoch_first = now
        self._epoch_last = now
        self._epoch_ok += 1

    def _adapt(self, now: float) -> float:
        """A fresh bare 429: block and probe, or cut the pace. Returns the pause."""
        self._streak += 1
        if self._probing:
            # a failed probe: the server still refuses; no cut, probe again soon
            blocked = now - self._blocked_at
            horizon = self._window or _DEFAULT_WINDOW_S
            if blocked > horizon:  # longer than a window: an outage, probe less often
                self._probe_s = min(_MAX_PROBE_S, max(self._probe_base, (blocked - horizon) / 10.0))
                self._recompute(now)
            return self._probe_s
        self._cut_seq = self._seq
        if self._rate is not None and self._streak == 1:
            # paced near the limit: a little too fast; the window frees again within a few slots
            self._rate *= _CUT
            self._grown_at = now
            self._recompute(now)
            self._next_req = max(self._next_req, now)
            logger.info("adaptive limit: now %.1f requests/min", self._rate * 60)
            return min(_PAUSE_S, _SHORT_PAUSE_SLOTS / self._rate)
        # The server refuses everything: after the unpaced start its window is full
        # (it frees one window after the start's first request), or a paced 429
        # was followed by another. Probe with one request at a time.
        if self._rate is None and self._epoch_first is not None:
            base = (self._epoch_last - self._epoch_first) / 2.0  # half the accepted burst
        elif self._rate is None:
            base = _FIRST_PROBE_S  # refused from the start: no burst to measure
        else:
            base = (self._window or _DEFAULT_WINDOW_S) / 20.0
        self._probe_base = self._probe_s = min(_FIRST_PROBE_S, max(_MIN_PROBE_S, base))
        self._probing = True
        self._blocked_at = now
        self._recompute(now)
        self._next_req = max(self._next_req, now)
        logger.info("rate limited: probing every %.2f s", self._probe_s)
        return self._probe_s

    def _reopen(self, now: float) -> None:
        """The first success of a request sent after the server started refusing."""
        self._probing = False
        if self._rate is None:
            if self._epoch_first is not None and self._epoch_ok:
                # The unpaced start filled the server's window, which let a request
                # through again one window after the start's first one: the gap
                # gives the window (at most the time to this answer, as answers
                # come a latency after the server counts them), the start the limit.
                window = max(now - self._epoch_first, _MIN_PROBE_S)
                self._window = window
                self._rate = _PACE_SHARE * self._epoch_ok / window
                logger.info(
                    "adaptive limit: learned %d requests per %.1f s, pacing %.1f requests/min",
                    self._epoch_ok, window, self._rate * 60,
                )
            else:  # refused from the start: nothing learned, start over unpaced
                self._epoch_first, self._epoch_last, self._epoch_ok = now, now, 1
        self._grown_at = now
        self._recompute(now)

    def _grow(self, now: float) -> None:
        assert self._rate is not None
        elapsed = now - self._grown_at
        if elapsed <= 0:
            return
        self._grown_at = now
        if now - self._bound_at > 1.0:
            return  # the pace is not what holds the workers back: no evidence to go faster
        window = self._window or _DEFAULT_WINDOW_S
        self._rate *= 1.0 + _GROWTH_PER_WINDOW * min(elapsed, window) / window
        self._recompute(now)

    # ------------------------------------------------------------------ headers

    def _apply_headers(
        self, headers: Mapping[str, str], now: float, reservation: Reservation | None
    ) -> None:
        seq = reservation.seq if reservation is not None else None
        sent_requests = self._seq - seq if seq is not None else self._in_flight
        if reservation is not None:
            sent_tokens = self._tokens_total - reservation.tokens_before - reservation.tokens
        else:
            sent_tokens = self._in_flight * self._max_tokens
        changed = self._hdr_req.apply(headers, now, seq, sent_requests)
        changed = self._hdr_tok.apply(headers, now, seq, sent_tokens) or changed
        if changed:
            self._recompute(now)

    # ------------------------------------------------------------------ pacing

    def _recompute(self, now: float) -> None:
        req_rate = math.inf
        if self._rpm is not None:
            req_rate = self._util * self._rpm / 60.0
        if self._hdr_req.limit is not None:
            req_rate = min(req_rate, self._util * self._hdr_req.limit / self._hdr_req.window)
        if self._probing:
            req_rate = min(req_rate, 1.0 / self._probe_s)
        elif self._rate is not None:
            req_rate = min(req_rate, self._rate)
        self._req_interval = 0.0 if req_rate == math.inf else 1.0 / req_rate
        # With both paces, a large request held by the token pace leaves its request
        # slot unused; the next small one may use it (bank up to one slot) rather than
        # lose it, as long as the window keeps room for it: then any window holds at
        # most rate * window + two requests. Without it, varied sizes cost ~5 %.
        bank_room = math.inf
        for limit in (self._rpm, self._hdr_req.limit):
            if limit is not None:
                bank_room = min(bank_room, (1.0 - self._util) * limit - 1.0)
        if self._rate is not None or self._probing:
            bank_room = 0.0  # an adaptive rate knows no room
        self._req_bank = 0.0

        tok_rate = math.inf
        for limit, window in ((self._tpm, 60.0), (self._hdr_tok.limit, self._hdr_tok.window)):
            if limit is not None:
                # any window then holds at most rate * window + one request
                per_window = max(min(self._util * limit, limit - self._max_tokens), 0.5 * limit)
                tok_rate = min(tok_rate, per_window / window)
        self._tok_rate = 0.0 if tok_rate == math.inf else tok_rate
        if self._tok_rate and self._req_interval and bank_room != math.inf:
            self._req_bank = max(0.0, min(1.0, bank_room))
        self._update_free(now)

    def _update_free(self, now: float) -> None:
        self._free = not (
            self._req_interval
            or self._tok_rate
            or self._hdr_req.budget is not None
            or self._hdr_tok.budget is not None
            or self._paused_until > now
        )

    # ------------------------------------------------------------------ reporting

    @property
    def stats(self) -> LimiterStats:
        """Counters and the rates in force now."""
        return LimiterStats(
            requests=self._seq,
            tokens_reserved=self._tokens_total,
            tokens_refunded=self._tokens_refunded,
            rate_limited=self._rate_limited,
            pauses=self._pauses,
            paused_s=self._paused_s,
            waiting=len(self._waiters),
            in_flight=self._in_flight,
            rpm=60.0 / self._req_interval if self._req_interval else None,
            tpm=60.0 * self._tok_rate if self._tok_rate else None,
            adaptive_rpm=60.0 / self._probe_s
            if self._probing
            else None
            if self._rate is None
            else 60.0 * self._rate,
            header_rpm=None
            if self._hdr_req.limit is None
            else 60.0 * self._hdr_req.limit / self._hdr_req.window,
            header_tpm=None
            if self._hdr_tok.limit is None
            else 60.0 * self._hdr_tok.limit / self._hdr_tok.window,
        )


def _has_rate_headers(headers: Mapping[str, str]) -> bool:
    return any(name in headers for name in _RATE_HEADERS)

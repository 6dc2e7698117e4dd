"""Pace requests and tokens to a rate: paced, not bursted.

A token bucket that starts full lets through a whole window's worth at once and
then keeps going at the full rate, which a sliding-window server answers with
429s. So each limit is a bucket of (almost) no capacity: request *i* may start
once request *i-1* has paid for itself (``1/rate`` seconds for a request,
``tokens/rate`` for its tokens), with a few milliseconds of tolerance so the
event loop's timer resolution does not cap throughput (the limiter's
``TOLERANCE_S``).

Pacing at ``utilization`` (0.98) of a limit keeps any window at most
``0.98 * limit + one request`` and leaves room for latency jitter; for tokens,
the pace is also lowered by the largest single reservation so that even that
extra request fits. Time the pace would lose is kept: up to 15 ms of a
waiter's lateness (a timer firing late on a busy loop), tokens given back while
the head waiter sleeps, and, when both paces hold and the limit leaves room for
it, one request slot left unused while a large request waited for tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

__all__ = ["Pace"]

# Lateness a waiter may make up: a timer that fires a little late (a busy event
# loop, timer resolution) would otherwise cost its slot that time, every slot.
_LATE_S = 0.015

Limit = tuple[float, float]  # (amount, window in seconds)


class Pace:
    """The earliest start of the next request and of the next token spend, at the rates set."""

    def __init__(self, utilization: float = 0.98) -> None:
        if not 0 < utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        self.utilization = utilization
        self.interval = 0.0  # seconds per request, 0 = unpaced
        self.token_rate = 0.0  # tokens per second, 0 = unpaced
        self.max_tokens = 0  # largest single reservation seen
        self._bank = 0.0  # request slots the pace may lag by and catch up (see follow)
        self._next_req = -math.inf
        self._next_tok = -math.inf
        self._credit = 0.0  # seconds of token pace given back since the last admission

    @property
    def active(self) -> bool:
        """Whether any pace holds requests back."""
        return bool(self.interval or self.token_rate)

    def follow(self, requests: Iterable[Limit], tokens: Iterable[Limit], cap: float | None) -> None:
        """Pace to the strictest of the ``requests`` and ``tokens`` limits and a request
        rate ``cap`` (per second, learned rather than given: it leaves no room to bank)."""
        util = self.utilization
        req_rate = math.inf
        bank_room = math.inf
        for limit, window in requests:
            req_rate = min(req_rate, util * limit / window)
            bank_room = min(bank_room, (1.0 - util) * limit - 1.0)
        if cap is not None:
            req_rate = min(req_rate, cap)
            bank_room = 0.0  # an adaptive rate knows no room
        self.interval = 0.0 if req_rate == math.inf else 1.0 / req_rate
        # With both paces, a large request held by the token pace leaves its request
        # slot unused; the next small one may use it (bank up to one slot) rather than
        # lose it, as long as the window keeps room for it: then any window holds at
        # most rate * window + two requests. Without it, varied sizes cost ~5 %.
        self._bank = 0.0
        tok_rate = math.inf
        for limit, window in tokens:
            # any window then holds at most rate * window + one request
            per_window = max(min(util * limit, limit - self.max_tokens), 0.5 * limit)
            tok_rate = min(tok_rate, per_window / window)
        self.token_rate = 0.0 if tok_rate == math.inf else tok_rate
        if self.token_rate and self.interval and bank_room != math.inf:
            self._bank = max(0.0, min(1.0, bank_room))

    def start(self, after: float) -> float:
        """When the next request may start, if not before ``after``."""
        start = after
        if self.interval and self._next_req > start:
            start = self._next_req
        if self.token_rate and self._next_tok > start:
            start = self._next_tok
        return start

    def grows(self, tokens: int) -> bool:
        """Note a reservation of ``tokens``; whether it is the largest yet."""
        if tokens > self.max_tokens:
            self.max_tokens = tokens
            return True
        return False

    def take(self, now: float, tokens: int) -> None:
        """A request of ``tokens`` starts now: the next one's slot follows it."""
        if self.interval:
            base = max(self._next_req, now - max(_LATE_S, self._bank * self.interval))
            self._next_req = base + self.interval
        if self.token_rate:
            # Refunds arrive while the head waiter sleeps to its start time; it wakes
            # after the (now earlier) slot, and that lateness must not be lost.
            self._next_tok = max(self._next_tok, now - _LATE_S - self._credit) + tokens / self.token_rate
            self._credit = 0.0

    def hold(self, now: float) -> None:
        """No request slot before ``now`` (after a cut or a block: no catching up)."""
        self._next_req = max(self._next_req, now)

    def give_back_request(self) -> None:
        """A request the server never took: its slot is free again."""
        if self.interval:
            self._next_req -= self.interval

    def adjust_tokens(self, refund: int, clock: Callable[[], float]) -> None:
        """Tokens given back (or, negative, charged) after the fact."""
        if not (refund and self.token_rate):
            return
        if refund < 0:  # under-estimated: the overrun is spent from now on at the latest
            self._next_tok = max(self._next_tok, clock())
        self._next_tok -= refund / self.token_rate
        if refund > 0:
            # at most one largest request's worth, so no burst builds up while idle
            cap = self.max_tokens / self.token_rate
            self._credit = min(cap, self._credit + refund / self.token_rate)

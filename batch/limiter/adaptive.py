"""Learn a request rate from bare 429s (Atoma: no headers, 429 for quota and overload alike).

Learned from the first gap, then paced. Until the first 429 nothing is paced,
so a sliding-window server takes a whole window's worth at once and then
refuses everything until that burst's first request leaves its window. The
first 429 blocks every worker and the job probes: one request every half of
the time the accepted burst took (0.05 to 0.5 s; 0.5 s if nothing was
accepted), and again that long after each failed probe, so the reopening is
found well within the burst's length and the stall stays under a window.
Failed probes do not lower anything. The first success of a request sent after
the block ends it: the time from the first success of the burst to this one is
the server's window W (an upper bound, by at most a probe interval and a
latency), the burst's successes its limit N, and from then on requests are
paced at 0.97 N / W. A 429 while paced cuts the rate to 0.95 of itself and
pauses two request intervals (the window frees again that soon); 429s for
requests sent before the cut belong to it. A second fresh 429 with no success
in between means the server refuses everything (an outage, or a limit far
below the pace): the job probes again, at W / 20 (0.05 to 0.5 s). Once any
block lasts longer than a window (60 s until one is learned) the probe interval
stretches to a tenth of the excess, at most 4 s, so a long outage costs few
429s yet never stalls; when the server accepts again, the job carries on at the
pace it had. A block before any success teaches nothing: the job starts over
unpaced. While workers are waiting on the pace, the rate grows by 1 % a learned
window (60 s until one is learned), so a low estimate recovers and a limit that
rises is found.
"""

from __future__ import annotations

import logging

__all__ = ["PAUSE_S", "AdaptiveRate"]

logger = logging.getLogger(__name__)

_DEFAULT_WINDOW_S = 60.0  # the window until one is learned (per-minute limits)
_PACE_SHARE = 0.97  # pace at this share of the learned limit / window
_CUT = 0.95  # a 429 while paced: the rate falls to this share
_GROWTH_PER_WINDOW = 0.01  # while workers wait on the pace, the rate grows this much a window
PAUSE_S = 1.0  # pause after a bare 429 when not adapting
_SHORT_PAUSE_SLOTS = 2.0  # pause after a 429 while paced, in request intervals
_MIN_PROBE_S = 0.05
_FIRST_PROBE_S = 0.5  # longest probe interval while a window may be about to free
_MAX_PROBE_S = 4.0  # longest probe interval in a long outage
_WAITED_S = 1.0  # a waiter held by the pace this recently: evidence the pace binds


class AdaptiveRate:
    """The state machine: unpaced, then probing after a block, then paced at a learned rate.

    Requests are numbered in admission order (``seq``); answers to requests sent
    before a cut or a block belong to it and neither cut again nor end it.
    """

    def __init__(self) -> None:
        self.rate: float | None = None  # requests per second learned; None = unpaced
        self.window: float | None = None  # the server's window, learned from the first gap
        self.probing = False  # blocked: one probe request per ``probe_s``
        self.probe_s = _MAX_PROBE_S
        self._probe_base = _MAX_PROBE_S
        self._streak = 0  # fresh 429s since the last success
        self._cut_seq = 0  # requests admitted before a cut or a block answer to it
        self._grown_at = 0.0
        self._blocked_at = 0.0
        self._epoch_first: float | None = None  # first success of the unpaced start (answer time)
        self._epoch_last = 0.0
        self._epoch_ok = 0

    @property
    def cap(self) -> float | None:
        """The request rate (per second) to pace at; ``None``: unpaced."""
        return 1.0 / self.probe_s if self.probing else self.rate

    @property
    def per_minute(self) -> float | None:
        """The rate in force, per minute (the probe rate while probing); ``None``: unpaced."""
        return 60.0 / self.probe_s if self.probing else None if self.rate is None else 60.0 * self.rate

    def fresh(self, seq: int | None) -> bool:
        """Whether an answer to request ``seq`` was sent after the last cut or block."""
        return seq is None or seq > self._cut_seq

    def on_success(self, now: float, seq: int | None, waited_at: float) -> bool:
        """A 2xx to request ``seq``; ``waited_at`` is when a waiter was last held by the
        pace. Returns whether the rate changed (the pace must follow)."""
        fresh = self.fresh(seq)
        if self.rate is None and (fresh or self.probing):
            self._count_success(now, fresh and self.probing)
        if not fresh:
            return False
        self._streak = 0
        if self.probing:
            self._reopen(now)
            return True
        if self.rate is not None:
            return self._grow(now, waited_at)
        return False

    def on_refused(self, now: float, admitted: int) -> tuple[float, bool]:
        """A fresh bare 429 (``admitted`` requests so far): block and probe, or cut the rate.
        Returns the pause and whether the rate changed."""
        self._streak += 1
        if self.probing:
            # a failed probe: the server still refuses; no cut, probe again soon
            blocked = now - self._blocked_at
            horizon = self.window or _DEFAULT_WINDOW_S
            if blocked > horizon:  # longer than a window: an outage, probe less often
                self.probe_s = min(_MAX_PROBE_S, max(self._probe_base, (blocked - horizon) / 10.0))
                return self.probe_s, True
            return self.probe_s, False
        self._cut_seq = admitted
        if self.rate is not None and self._streak == 1:
            # paced near the limit: a little too fast; the window frees again within a few slots
            self.rate *= _CUT
            self._grown_at = now
            logger.info("adaptive limit: now %.1f requests/min", self.rate * 60)
            return min(PAUSE_S, _SHORT_PAUSE_SLOTS / self.rate), True
        # The server refuses everything: after the unpaced start its window is full
        # (it frees one window after the start's first request), or a paced 429
        # was followed by another. Probe with one request at a time.
        if self.rate is None and self._epoch_first is not None:
            base = (self._epoch_last - self._epoch_first) / 2.0  # half the accepted burst
        elif self.rate is None:
            base = _FIRST_PROBE_S  # refused from the start: no burst to measure
        else:
            base = (self.window or _DEFAULT_WINDOW_S) / 20.0
        self._probe_base = self.probe_s = min(_FIRST_PROBE_S, max(_MIN_PROBE_S, base))
        self.probing = True
        self._blocked_at = now
        logger.info("rate limited: probing every %.2f s", self.probe_s)
        return self.probe_s, True

    def _count_success(self, now: float, reopening: bool) -> None:
        """A success of the unpaced start (or of its tail, answered late)."""
        if reopening:
            return
        if self._epoch_first is None:
            self._epoch_first = now
        self._epoch_last = now
        self._epoch_ok += 1

    def _reopen(self, now: float) -> None:
        """The first success of a request sent after the server started refusing."""
        self.probing = False
        if self.rate is None:
            if self._epoch_first is not None and self._epoch_ok:
                # The unpaced start filled the server's window, which let a request
                # through again one window after the start's first one: the gap
                # gives the window (at most the time to this answer, as answers
                # come a latency after the server counts them), the start the limit.
                window = max(now - self._epoch_first, _MIN_PROBE_S)
                self.window = window
                self.rate = _PACE_SHARE * self._epoch_ok / window
                logger.info(
                    "adaptive limit: learned %d requests per %.1f s, pacing %.1f requests/min",
                    self._epoch_ok, window, self.rate * 60,
                )
            else:  # refused from the start: nothing learned, start over unpaced
                self._epoch_first, self._epoch_last, self._epoch_ok = now, now, 1
        self._grown_at = now

    def _grow(self, now: float, waited_at: float) -> bool:
        assert self.rate is not None
        elapsed = now - self._grown_at
        if elapsed <= 0:
            return False
        self._grown_at = now
        if now - waited_at > _WAITED_S:
            return False  # the pace is not what holds the workers back: no evidence to go faster
        window = self.window or _DEFAULT_WINDOW_S
        self.rate *= 1.0 + _GROWTH_PER_WINDOW * min(elapsed, window) / window
        return True

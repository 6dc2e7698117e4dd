"""Follow a server's ``x-ratelimit-*`` headers (OpenAI, gateways).

``x-ratelimit-limit-requests`` / ``-tokens`` give the limit; the window is taken
as the longest ``x-ratelimit-reset-*`` seen (a fresh window resets in a full
window), 60 s until then. The limiter paces to that limit. ``remaining`` and
``reset`` add a gate: the remaining budget, minus what was sent since the
answer that reported it, may be spent before ``reset``; once spent, everyone
waits for the reset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from batch.ratelimits import header_duration, header_number

__all__ = ["DEFAULT_WINDOW_S", "HeaderBudget", "HeaderLimit"]

# Default window of a limit until a reset header says otherwise (per-minute limits).
DEFAULT_WINDOW_S = 60.0


@dataclass(slots=True)
class HeaderLimit:
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
        limit = header_number(headers, f"x-ratelimit-limit-{self.kind}")
        reset = header_duration(headers, f"x-ratelimit-reset-{self.kind}")
        if limit is not None and limit > 0:
            window = max(self.window, reset or 0.0) or DEFAULT_WINDOW_S
            if limit != self.limit or window != self.window:
                self.limit, self.window = limit, window
                changed = True
        remaining = header_number(headers, f"x-ratelimit-remaining-{self.kind}")
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

    @property
    def per_minute(self) -> float | None:
        """The limit as a rate per minute; ``None`` until a header gave one."""
        return None if self.limit is None else 60.0 * self.limit / self.window

    def limits(self) -> list[tuple[float, float]]:
        """``[(limit, window)]`` once a header gave a limit, else ``[]``."""
        return [] if self.limit is None else [(self.limit, self.window)]

    def _fresher(self, seq: int | None) -> bool:
        """Whether an answer to request ``seq`` is newer than the one the budget came from."""
        if seq is None:
            return True
        if seq < self.budget_seq:
            return False
        self.budget_seq = seq
        return True


class HeaderBudget:
    """The request and token limits and budgets a server's headers reported."""

    def __init__(self) -> None:
        self.requests = HeaderLimit("requests")
        self.tokens = HeaderLimit("tokens")

    def apply(
        self, headers: Mapping[str, str], now: float, seq: int | None, sent_requests: float, sent_tokens: float
    ) -> bool:
        """Follow one answer's headers (to request ``seq``; ``None``: unknown); whether a
        limit or budget changed."""
        changed = self.requests.apply(headers, now, seq, sent_requests)
        return self.tokens.apply(headers, now, seq, sent_tokens) or changed

    @property
    def holding(self) -> bool:
        """Whether a budget is being counted down (so every admission must check it)."""
        return self.requests.budget is not None or self.tokens.budget is not None

    def hold_until(self, now: float, tokens: int) -> float:
        """When a request of ``tokens`` fits both budgets: -inf if it does now."""
        return max(self.requests.hold_until(now, 1), self.tokens.hold_until(now, tokens))

    def spend(self, tokens: int) -> None:
        """A request of ``tokens`` was sent."""
        self.requests.spend(1)
        self.tokens.spend(tokens)

    def spent_wait(self, now: float) -> float | None:
        """Seconds until the latest reset of a budget that is spent; ``None`` if none is."""
        resets = []
        if self.requests.budget is not None and self.requests.budget < 1:
            resets.append(self.requests.reset_at - now)
        if self.tokens.budget is not None and self.tokens.budget <= 0:
            resets.append(self.tokens.reset_at - now)
        return max(resets) if resets else None

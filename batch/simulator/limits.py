"""The simulator's sliding-window RPM/TPM limits and the headers that describe them."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["SlidingWindow", "duration"]


class SlidingWindow:
    """Admitted requests (and their token reservations) within the last ``window_s`` seconds.

    The limits are passed to every call, so a change of settings applies at once.
    """

    def __init__(self) -> None:
        self.req_times: deque[float] = deque()
        self.tok_times: deque[tuple[float, int]] = deque()
        self.tok_sum = 0

    def _prune(self, now: float, window_s: float) -> None:
        horizon = now - window_s
        times = self.req_times
        while times and times[0] <= horizon:
            times.popleft()
        toks = self.tok_times
        while toks and toks[0][0] <= horizon:
            self.tok_sum -= toks.popleft()[1]

    def admit(self, cost: int, now: float, rpm: int | None, tpm: int | None, window_s: float) -> tuple[bool, float]:
        """Admit one request costing ``cost`` tokens, or say how long until it would fit."""
        self._prune(now, window_s)
        wait = 0.0
        if rpm is not None and len(self.req_times) >= rpm:
            oldest = self.req_times[len(self.req_times) - rpm]
            wait = oldest + window_s - now
        if tpm is not None and self.tok_sum + cost > tpm:
            if cost > tpm:
                wait = max(wait, window_s)
            else:
                freed, need = 0, self.tok_sum + cost - tpm
                for stamp, tokens in self.tok_times:
                    freed += tokens
                    if freed >= need:
                        wait = max(wait, stamp + window_s - now)
                        break
        if wait > 0:
            return False, wait
        if rpm is not None:
            self.req_times.append(now)
        if tpm is not None:
            self.tok_times.append((now, cost))
            self.tok_sum += cost
        return True, 0.0

    def headers(self, now: float, rpm: int | None, tpm: int | None, window_s: float,
                retry_after: float | None) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers (and ``Retry-After`` when refusing)."""
        headers: list[tuple[bytes, bytes]] = []
        if rpm is not None:
            remaining = max(rpm - len(self.req_times), 0)
            reset = self.req_times[0] + window_s - now if self.req_times else 0.0
            headers += [
                (b"x-ratelimit-limit-requests", str(rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(remaining).encode()),
                (b"x-ratelimit-reset-requests", duration(reset).encode()),
            ]
        if tpm is not None:
            remaining = max(tpm - self.tok_sum, 0)
            reset = self.tok_times[0][0] + window_s - now if self.tok_times else 0.0
            headers += [
                (b"x-ratelimit-limit-tokens", str(tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(remaining).encode()),
                (b"x-ratelimit-reset-tokens", duration(reset).encode()),
            ]
        if retry_after is not None:
            headers += [
                (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
                (b"retry-after-ms", str(max(1, math.ceil(retry_after * 1000))).encode()),
            ]
        return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"

"""Virtual time and a sliding-window server for the limiter's tests: minutes of rate limiting run in milliseconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from batch.limiter import Limiter


class FakeClock:
    """For one task: sleeping just moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


class VirtualTime:
    """A clock and a sleep for many tasks: time jumps to the next wake-up once every task waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        event = anyio.Event()
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), next(self._order), event))
        await event.wait()

    async def _settle(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        while getattr(loop, "_ready", ()):  # run every task that can run before time moves
            await asyncio.sleep(0)

    async def drive(self, until: Callable[[], bool], limit_s: float = 3600.0) -> None:
        """Advance time until ``until()`` holds (checked whenever every task waits)."""
        while True:
            await self._settle()
            if until():
                return
            if not self._timers:
                raise AssertionError("deadlock: every task waits and no timer is set")
            wake = self._timers[0][0]
            if wake > limit_s:
                raise AssertionError(f"still running at {limit_s} s of virtual time")
            self.now = wake
            while self._timers and self._timers[0][0] <= wake:
                heapq.heappop(self._timers)[2].set()


async def run_tasks(vt: VirtualTime, *tasks: Callable[[], Awaitable[None]], limit_s: float = 3600.0) -> None:
    done = 0

    async def wrap(task: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        await task()
        done += 1

    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(wrap, task)
        await vt.drive(lambda: done == len(tasks), limit_s)


def max_in_window(times: list[float], window: float, weights: list[float] | None = None) -> float:
    """The most (weighted) events in any half-open window (t - window, t]."""
    weights = weights or [1.0] * len(times)
    best = total = 0.0
    queue: deque[tuple[float, float]] = deque()
    for t, w in sorted(zip(times, weights, strict=True)):
        queue.append((t, w))
        total += w
        while queue[0][0] <= t - window:
            total -= queue.popleft()[1]
        best = max(best, total)
    return best


# ---------------------------------------------------------------- a rate-limited server


@dataclass
class Server:
    """A sliding-window rate limit like the simulator's: ``limit`` requests (and
    optionally ``tpm`` tokens reserved at admission) per ``window`` seconds."""

    vt: VirtualTime
    limit: int
    window: float
    tpm: int | None = None
    style: str = "bare"  # "bare" (Atoma) or "openai" (x-ratelimit-* and retry-after)
    outage: tuple[float, float] | None = None  # 429 for everything in [start, end)
    accepted: deque[tuple[float, int]] = field(default_factory=deque)
    ok_times: list[float] = field(default_factory=list)
    rejected_times: list[float] = field(default_factory=list)

    def admit(self, tokens: int) -> tuple[bool, dict[str, str]]:
        now = self.vt.now
        while self.accepted and self.accepted[0][0] <= now - self.window:
            self.accepted.popleft()
        used_tokens = sum(t for _, t in self.accepted)
        ok = len(self.accepted) < self.limit and (
            self.tpm is None or used_tokens + tokens <= self.tpm
        )
        if self.outage and self.outage[0] <= now < self.outage[1]:
            ok = False
        if ok:
            self.accepted.append((now, tokens))
            self.ok_times.append(now)
        else:
            self.rejected_times.append(now)
        if self.style == "bare":
            return ok, {}
        remaining = self.limit - len(self.accepted)
        # seconds until the oldest request in the window leaves it
        reset = self.accepted[0][0] + self.window - now if self.accepted else 0.0
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }
        if not ok:
            headers["retry-after"] = str(max(1, math.ceil(reset)))
        return ok, headers


@dataclass
class Outcome:
    ok: int = 0
    rate_limited: int = 0


async def drive_workers(
    vt: VirtualTime,
    limiter: Limiter,
    server: Server,
    *,
    workers: int,
    duration: float,
    latency: float = 0.2,
    tokens: int = 1,
    settle_with: int | None = None,
) -> Outcome:
    """Workers send as fast as the limiter lets them until ``duration``; a 429 is retried."""
    outcome = Outcome()

    async def worker() -> None:
        while vt.now < duration:
            res = await limiter.acquire(tokens)
            await vt.sleep(latency / 2)  # on its way to the server
            ok, headers = server.admit(tokens)
            await vt.sleep(latency / 2)
            if ok:
                outcome.ok += 1
                limiter.on_response(headers, res)
                limiter.settle(res, settle_with)
            else:
                outcome.rate_limited += 1
                limiter.on_rate_limited(headers, res)

    await run_tasks(vt, *([worker] * workers))
    return outcome


def steady_share(server: Server, start: float, end: float) -> float:
    """Accepted requests in [start, end) as a share of what the limit allows there."""
    n = sum(1 for t in server.ok_times if start <= t < end)
    return n / (server.limit * (end - start) / server.window)


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(t for t in times if start <= t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


async def drive_varied(vt: VirtualTime, limiter: Limiter, server: Server, *, duration: float,
                       over_estimate: float = 0.0, workers: int = 32) -> None:
    """Workers send rows of varied token cost (71 to 106), estimated high by ``over_estimate``
    and settled against the real cost, as the runner does."""
    costs = itertools.cycle([71 + (i * 37) % 36 for i in range(97)])

    async def worker() -> None:
        while vt.now < duration:
            cost = next(costs)
            res = await limiter.acquire(round(cost * (1 + over_estimate)))
            await vt.sleep(0.05)
            ok, headers = server.admit(cost)
            await vt.sleep(0.05)
            if ok:
                limiter.on_response(headers, res)
                limiter.settle(res, cost)
            else:
                limiter.on_rate_limited(headers, res)

    await run_tasks(vt, *([worker] * workers))

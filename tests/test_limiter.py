"""The limiter under a virtual clock: minutes of rate limiting run in milliseconds."""

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
import pytest

from batch.limiter import Limiter, estimate_tokens, parse_duration


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


# ---------------------------------------------------------------- estimate and durations


def test_estimate_counts_prompt_and_max_tokens_times_n() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 100, "n": 2}
    assert estimate_tokens(chat) == 10 + 4 + 3 + 200
    completion = {"prompt": "y" * 41, "max_tokens": 7}
    assert estimate_tokens(completion) == 11 + 7


def test_estimate_without_max_tokens_counts_what_atoma_reserves() -> None:
    assert estimate_tokens({"prompt": ""}) == 8192


def test_estimate_tolerates_content_parts_and_odd_values() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "abcd" * 5}]},
            {"role": "assistant", "content": None},
            "not a message",
        ],
        "max_tokens": 1,
        "n": "two",
    }
    assert estimate_tokens(body) == 5 + 3 + 4 * 3 + 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5s", 1.5), ("1h2m3s", 3723.0), ("2", 2.0)],
)
def test_parse_duration_reads_openai_reset_format(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "1s2"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


# ---------------------------------------------------------------- unlimited fast path


async def test_unlimited_acquire_never_waits_or_reads_the_clock() -> None:
    def clock() -> float:
        raise AssertionError("the fast path read the clock")

    async def sleep(seconds: float) -> None:
        raise AssertionError("the fast path slept")

    limiter = Limiter(clock=clock, sleep=sleep, adaptive=False)
    for _ in range(10_000):
        limiter.settle(await limiter.acquire(100), 50)
    assert limiter.stats.requests == 10_000
    assert limiter.stats.in_flight == 0
    assert limiter.stats.rpm is None


# ---------------------------------------------------------------- configured limits


async def test_rpm_holds_over_minutes_with_many_workers() -> None:
    vt = VirtualTime()
    limiter = Limiter(rpm=120, clock=vt.clock, sleep=vt.sleep)
    starts: list[float] = []

    async def worker() -> None:
        for _ in range(12):
            await limiter.acquire(1)
            starts.append(vt.now)

    await run_tasks(vt, *([worker] * 50))
    assert len(starts) == 600
    assert max_in_window(starts, 60.0) <= 120
    # paced at 98 % of the limit, not slower
    assert max(starts) == pytest.approx(599 * 60 / (120 * 0.98), rel=0.01)


async def test_first_minute_is_paced_not_bursted() -> None:
    vt = VirtualTime()
    limiter = Limiter(rpm=60, clock=vt.clock, sleep=vt.sleep)
    starts: list[float] = []

    async def worker() -> None:
        await limiter.acquire(1)
        starts.append(vt.now)

    await run_tasks(vt, *([worker] * 30))
    assert max_in_window(starts, 5.0) <= 6  # about one a second from the start


async def test_tpm_holds_in_every_minute() -> None:
    vt = VirtualTime()
    limiter = Limiter(tpm=10_000, clock=vt.clock, sleep=vt.sleep)
    starts: list[float] = []

    async def worker() -> None:
        for _ in range(10):
            await limiter.acquire(400)
            starts.append(vt.now)

    await run_tasks(vt, *([worker] * 10))
    assert max_in_window(starts, 60.0, [400.0] * len(starts)) <= 10_000
    # 100 requests of 400 = 40,000 tokens, about four minutes at 10,000 a minute
    assert max(starts) <= 4.2 * 60


async def test_rpm_and_tpm_together_the_stricter_wins() -> None:
    vt = VirtualTime()
    limiter = Limiter(rpm=600, tpm=6_000, clock=vt.clock, sleep=vt.sleep)
    starts: list[float] = []

    async def worker() -> None:
        for _ in range(20):
            await limiter.acquire(100)
            starts.append(vt.now)

    await run_tasks(vt, *([worker] * 5))
    assert max_in_window(starts, 60.0) <= 60  # 6,000 tokens / 100 each


async def test_settle_gives_back_an_over_estimate() -> None:
    async def admitted_in_two_minutes(actual: int | None) -> int:
        vt = VirtualTime()
        limiter = Limiter(tpm=6_000, clock=vt.clock, sleep=vt.sleep)
        count = 0

        async def worker() -> None:
            nonlocal count
            while vt.now < 120:
                res = await limiter.acquire(1_000)
                count += 1
                await vt.sleep(0.5)
                limiter.settle(res, actual)

        await run_tasks(vt, *([worker] * 4))
        return count

    kept = await admitted_in_two_minutes(None)
    refunded = await admitted_in_two_minutes(250)
    assert refunded >= 3 * kept
    assert refunded * 250 <= 2 * 6_000 + 4 * 1_000  # yet the real tokens stay within the limit


async def test_settle_charges_an_under_estimate() -> None:
    vt = FakeClock()
    limiter = Limiter(tpm=6_000, clock=vt.clock, sleep=vt.sleep)
    limiter.settle(await limiter.acquire(100), 3_000)
    await limiter.acquire(100)
    assert vt.now >= 25  # the 2,900 tokens too many are paid for at 100 a second


async def test_release_gives_back_the_request_and_tokens() -> None:
    vt = FakeClock()
    limiter = Limiter(rpm=6, clock=vt.clock, sleep=vt.sleep)
    limiter.release(await limiter.acquire(1))
    await limiter.acquire(1)
    assert vt.now == 0.0
    assert limiter.stats.tokens_refunded == 1


async def test_finishing_a_reservation_twice_changes_nothing() -> None:
    vt = FakeClock()
    limiter = Limiter(tpm=6_000, clock=vt.clock, sleep=vt.sleep)
    res = await limiter.acquire(1_000)
    limiter.settle(res, 100)
    limiter.release(res)
    limiter.settle(res, 0)
    assert limiter.stats.tokens_refunded == 900
    assert limiter.stats.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue_working() -> None:
    vt = VirtualTime()
    limiter = Limiter(rpm=60, clock=vt.clock, sleep=vt.sleep)
    await limiter.acquire(1)
    got: list[float] = []

    async def waiter() -> None:
        await limiter.acquire(1)
        got.append(vt.now)

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:
            vt_task = limiter.acquire(1)
            scope.cancel()
            await vt_task

    await run_tasks(vt, waiter, cancelled, waiter)
    assert len(got) == 2
    assert limiter.stats.waiting == 0


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rpm"):
        Limiter(rpm=0)
    with pytest.raises(ValueError, match="tpm"):
        Limiter(tpm=-5)


# ---------------------------------------------------------------- headers


async def test_headers_set_the_pace() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    res = await limiter.acquire(10)
    limiter.on_response(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1m0s",
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-tokens": "5990",
            "x-ratelimit-reset-tokens": "60s",
        },
        res,
    )
    assert limiter.stats.header_rpm == pytest.approx(60)
    assert limiter.stats.header_tpm == pytest.approx(6000)
    starts: list[float] = []

    async def worker() -> None:
        for _ in range(30):
            await limiter.acquire(10)
            starts.append(vt.now)

    await run_tasks(vt, worker, worker)
    assert max_in_window(starts, 60.0) <= 60
    assert max(starts) >= 59 * 60 / 60 * 0.98


async def test_remaining_zero_waits_for_the_reset() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    res = await limiter.acquire(10)
    limiter.on_response(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20ms"}, res
    )
    await limiter.acquire(10)
    assert vt.now == pytest.approx(0.02)
    # once the reset passed and no limit is known, nothing is paced any more
    await limiter.acquire(10)
    assert vt.now == pytest.approx(0.02)


async def test_remaining_counts_requests_sent_after_the_answered_one() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    first = await limiter.acquire(1)
    for _ in range(3):
        await limiter.acquire(1)
    # the server had 3 left when it answered the first; the 3 sent since use them up
    limiter.on_response(
        {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"}, first
    )
    await limiter.acquire(1)
    assert vt.now == pytest.approx(2.0)


async def test_a_stale_answer_does_not_override_a_fresh_one() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    older, newer = await limiter.acquire(1), await limiter.acquire(1)
    limiter.on_response(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"}, newer
    )
    limiter.on_response(
        {"x-ratelimit-remaining-requests": "50", "x-ratelimit-reset-requests": "1s"}, older
    )
    await limiter.acquire(1)
    assert vt.now == pytest.approx(5.0)


async def test_429_with_retry_after_pauses_for_it() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    res = await limiter.acquire(1)
    assert limiter.on_rate_limited({"retry-after": "7"}, res) == pytest.approx(7.0)
    await limiter.acquire(1)
    assert vt.now == pytest.approx(7.0)


async def test_429_with_retry_after_ms_pauses_for_it() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    assert limiter.on_rate_limited({"retry-after-ms": "250"}) == pytest.approx(0.25)


# ---------------------------------------------------------------- bare 429s


async def test_a_429_pauses_every_worker_and_lowers_the_rate() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    for _ in range(100):  # 100 answers in the first 10 s: 10 a second
        vt.now += 0.1
        limiter.on_response({}, await limiter.acquire(1))
    res = await limiter.acquire(1)
    pause = limiter.on_rate_limited({}, res)
    assert pause > 0
    assert limiter.stats.adaptive_rpm is not None
    assert limiter.stats.adaptive_rpm < 10 * 60
    paused_at = vt.now
    starts: list[float] = []

    async def worker() -> None:
        await limiter.acquire(1)
        starts.append(vt.now)

    await run_tasks(vt, *([worker] * 20))
    assert min(starts) >= paused_at + pause  # nobody went during the pause
    assert max_in_window(starts, 1.0) <= 10  # and after it they are paced


async def test_429s_for_requests_sent_before_the_cut_do_not_cut_again() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    for _ in range(60):
        vt.now += 0.1
        limiter.on_response({}, await limiter.acquire(1))
    in_flight = [await limiter.acquire(1) for _ in range(10)]
    limiter.on_rate_limited({}, in_flight[0])
    rate = limiter.stats.adaptive_rpm
    for res in in_flight[1:]:
        limiter.on_rate_limited({}, res)
    assert limiter.stats.adaptive_rpm == rate
    assert limiter.stats.pauses == 1


async def test_a_429_with_no_adaptation_still_pauses_but_keeps_the_rate() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep, adaptive=False)
    assert limiter.on_rate_limited({}) > 0
    assert limiter.stats.adaptive_rpm is None


# ---------------------------------------------------------------- against a sliding-window server


@pytest.mark.parametrize(("limit", "window"), [(600, 60.0), (100, 10.0), (20, 1.0)])
async def test_limits_equal_to_the_servers_give_full_throughput_and_no_429(
    limit: int, window: float
) -> None:
    vt = VirtualTime()
    rpm = limit * 60 / window
    limiter = Limiter(rpm=rpm, clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=limit, window=window)
    outcome = await drive_workers(vt, limiter, server, workers=64, duration=5 * window)
    assert outcome.rate_limited == 0
    assert steady_share(server, 0, 5 * window) >= 0.97


async def test_tpm_equal_to_the_servers_gives_no_429() -> None:
    vt = VirtualTime()
    limiter = Limiter(tpm=50_000, clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=10**9, window=60.0, tpm=50_000)
    outcome = await drive_workers(vt, limiter, server, workers=64, duration=300, tokens=1_200)
    assert outcome.rate_limited == 0
    assert outcome.ok * 1_200 >= 0.93 * 5 * 50_000


@pytest.mark.parametrize(("limit", "window"), [(600, 60.0), (100, 10.0)])
async def test_server_headers_alone_give_high_throughput_and_few_429s(
    limit: int, window: float
) -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=limit, window=window, style="openai")
    outcome = await drive_workers(vt, limiter, server, workers=64, duration=6 * window)
    assert outcome.rate_limited <= 0.02 * outcome.ok
    assert steady_share(server, 0, 6 * window) >= 0.90


@pytest.mark.parametrize(("limit", "window"), [(600, 60.0), (100, 10.0), (20, 1.0)])
async def test_bare_429s_are_learned_without_stalls(limit: int, window: float) -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=limit, window=window)
    duration = max(10 * window, 150.0)
    await drive_workers(vt, limiter, server, workers=64, duration=duration)
    assert steady_share(server, 0, duration) >= 0.85
    # the unpaced start fills the server's window and every request then in
    # flight gets a 429; after that first window they stay rare
    warm = 2 * window
    ok = sum(1 for t in server.ok_times if t >= warm)
    rejected = sum(1 for t in server.rejected_times if t >= warm)
    assert rejected <= 0.05 * (ok + rejected)
    assert longest_gap(server.ok_times, window, duration) <= window


async def test_recovers_within_a_few_windows_after_an_outage() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    window = 10.0
    server = Server(vt, limit=100, window=window, outage=(60.0, 180.0))
    await drive_workers(vt, limiter, server, workers=64, duration=300)
    # it kept probing through two minutes of 429s and was back at once
    assert longest_gap(server.ok_times, 180, 300) <= window
    assert steady_share(server, 180 + 3 * window, 300) >= 0.85


async def test_bare_429s_over_a_whole_run_as_the_benchmark_counts_them() -> None:
    # the first window goes at once; the gap after it teaches the window and the limit
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    window = 10.0
    server = Server(vt, limit=300, window=window)
    outcome = await drive_workers(vt, limiter, server, workers=32, duration=6 * window, latency=0.1)
    assert steady_share(server, 0, 6 * window) >= 0.90
    assert outcome.rate_limited <= 0.05 * (outcome.ok + outcome.rate_limited)
    assert longest_gap(server.ok_times, 0, 6 * window) <= window
    learned = limiter.stats.adaptive_rpm
    assert learned is not None
    assert 0.9 * 300 * 6 <= learned <= 1.02 * 300 * 6


async def test_failed_probes_go_one_at_a_time_and_lower_nothing() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    window = 10.0
    server = Server(vt, limit=100, window=window)
    await drive_workers(vt, limiter, server, workers=64, duration=3 * window)
    # the unpaced start: 100 taken by 0.3 s, what was sent by the first 429 (0.4 s) refused;
    # then single probes, one per half the burst's 0.2 s (less a timer's tolerance)
    probes = [t for t in server.rejected_times if t > 0.7]
    assert max_in_window(probes, 0.08) <= 1
    assert len(probes) <= window / 0.08
    # failed probes did not drag the pace down: it is the server's limit, learned
    learned = limiter.stats.adaptive_rpm
    assert learned is not None
    assert learned >= 0.9 * 100 * 60 / window


async def test_refused_from_the_start_probes_gently_then_runs_unpaced() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=10**6, window=10.0, outage=(0.0, 20.0))
    await drive_workers(vt, limiter, server, workers=16, duration=30)
    probes = [t for t in server.rejected_times if t > 0.5]
    assert len(probes) <= 20 / 0.5
    assert min(server.ok_times) <= 21.0
    # nothing was learned from a gap with no success before it
    assert limiter.stats.adaptive_rpm is None


async def test_a_long_outage_costs_few_probes() -> None:
    vt = VirtualTime()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep)
    window = 10.0
    server = Server(vt, limit=100, window=window, outage=(60.0, 600.0))
    await drive_workers(vt, limiter, server, workers=64, duration=660)
    probes = [t for t in server.rejected_times if 60 <= t < 600]
    assert len(probes) <= 200  # about one every 4 s once the outage outlasts a window
    assert longest_gap(server.ok_times, 600, 660) <= window


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


async def test_over_estimates_given_back_while_waiters_sleep_are_not_lost() -> None:
    vt = VirtualTime()
    window, limit = 10.0, 200
    tpm_window = limit * 88  # tokens bind: the rows average ~88
    limiter = Limiter(tpm=tpm_window * 60 / window, clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=10**9, window=window, tpm=tpm_window)
    await drive_varied(vt, limiter, server, duration=6 * window, over_estimate=0.1)
    assert not server.rejected_times
    tokens = sum(t for _, t in server.accepted)  # the last window's worth
    assert tokens >= 0.96 * tpm_window


async def test_both_limits_binding_with_varied_sizes_keep_full_throughput() -> None:
    vt = VirtualTime()
    window, limit = 10.0, 200
    tpm_window = limit * 88
    per_minute = 60 / window
    limiter = Limiter(rpm=limit * per_minute, tpm=tpm_window * per_minute, clock=vt.clock, sleep=vt.sleep)
    server = Server(vt, limit=limit, window=window, tpm=tpm_window)
    await drive_varied(vt, limiter, server, duration=6 * window, over_estimate=0.1)
    assert not server.rejected_times
    assert steady_share(server, 0, 6 * window) >= 0.95

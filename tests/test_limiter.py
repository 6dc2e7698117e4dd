"""The limiter's facade: the unlimited fast path, reservations, the waiters' queue, the pause a 429 asks for."""

from __future__ import annotations

import anyio
import pytest

from batch.limiter import Limiter
from tests.virtual_time import FakeClock, VirtualTime, run_tasks


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


async def test_a_429_with_no_adaptation_still_pauses_but_keeps_the_rate() -> None:
    vt = FakeClock()
    limiter = Limiter(clock=vt.clock, sleep=vt.sleep, adaptive=False)
    assert limiter.on_rate_limited({}) > 0
    assert limiter.stats.adaptive_rpm is None

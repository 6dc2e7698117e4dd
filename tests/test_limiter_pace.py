"""Pacing to a given RPM/TPM (batch.limiter.pace), under a virtual clock."""

from __future__ import annotations

import pytest

from batch.limiter import Limiter
from tests.virtual_time import (
    FakeClock,
    Server,
    VirtualTime,
    drive_varied,
    drive_workers,
    max_in_window,
    run_tasks,
    steady_share,
)


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

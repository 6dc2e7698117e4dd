"""Following x-ratelimit-* headers (batch.limiter.headers), under a virtual clock."""

from __future__ import annotations

import pytest

from batch.limiter import Limiter
from tests.virtual_time import (
    FakeClock,
    Server,
    VirtualTime,
    drive_workers,
    max_in_window,
    run_tasks,
    steady_share,
)


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

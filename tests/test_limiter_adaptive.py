"""Learning a rate from bare 429s (batch.limiter.adaptive), under a virtual clock."""

from __future__ import annotations

import pytest

from batch.limiter import Limiter
from tests.virtual_time import (
    FakeClock,
    Server,
    VirtualTime,
    drive_workers,
    longest_gap,
    max_in_window,
    run_tasks,
    steady_share,
)


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

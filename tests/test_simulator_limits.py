"""The simulator's sliding-window limits, on a clock passed in."""

from __future__ import annotations

import pytest

from batch.simulator import SimConfig, SimState
from batch.simulator.limits import SlidingWindow, duration


def test_sliding_window_frees_budget_as_it_moves() -> None:
    now = [100.0]
    state = SimState(SimConfig(rpm=2, tpm=50, window_s=10.0), clock=lambda: now[0])
    assert state.admit(10) == (True, 0.0)
    now[0] = 104.0
    assert state.admit(10) == (True, 0.0)
    admitted, wait = state.admit(10)
    assert not admitted and wait == pytest.approx(6.0)  # the first request leaves the window at 110
    now[0] = 110.5
    assert state.admit(10)[0]
    assert not state.admit(45)[0]  # 20 tokens in the window, 45 more would pass 50
    now[0] = 114.5
    assert state.admit(40)[0]



def test_headers_say_what_is_left_and_when_it_resets() -> None:
    window = SlidingWindow()
    assert window.admit(30, 100.0, 2, 50, 10.0) == (True, 0.0)
    headers = dict(window.headers(101.5, 2, 50, 10.0, retry_after=0.2))
    assert headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"20"
    assert headers[b"x-ratelimit-reset-requests"] == b"8.5s"
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"200")


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (360.0, "6m0s"), (-1.0, "0ms")])
def test_reset_durations_read_like_openai_s(seconds: float, text: str) -> None:
    assert duration(seconds) == text

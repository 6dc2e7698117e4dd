"""What is retried, how long each retry waits, and when a row gives up."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping

import anyio.lowlevel
import pytest

from batch.errors import (
    APIConnectionError,
    APIStatusError,
    RequestError,
    ResponseError,
)
from batch.retry import RetryPolicy, RetrySettings, classify


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def status(code: int, error_code: str | None = None, headers: Mapping[str, str] | None = None) -> APIStatusError:
    return APIStatusError(f"HTTP {code}", http_status=code, code=error_code, headers=headers)


def scripted(*answers: object) -> tuple[Callable[[], object], list[int]]:
    """An attempt that raises or returns each answer in turn; counts its calls."""
    calls = [0]

    async def attempt() -> object:
        answer = answers[calls[0]]
        calls[0] += 1
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return attempt, calls


def policy(fake: FakeClock, **settings: object) -> RetryPolicy:
    return RetryPolicy(
        RetrySettings(**settings),  # type: ignore[arg-type]
        sleep=fake.sleep,
        clock=fake.clock,
        rng=random.Random(1),
    )


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("code", [408, 409, 425, 429, 500, 502, 503, 504, 520, 599])
def test_retried_statuses(code: int) -> None:
    assert classify(status(code)) == "retry"


@pytest.mark.parametrize("code", [400, 404, 405, 413, 422, 451])
def test_statuses_that_fail_the_row(code: int) -> None:
    assert classify(status(code)) == "fail"


@pytest.mark.parametrize("code", [401, 402, 403])
def test_statuses_that_stop_the_job(code: int) -> None:
    assert classify(status(code)) == "fatal"


@pytest.mark.parametrize(
    "error_code", ["insufficient_quota", "INSUFFICIENT_QUOTA", "insufficient_balance", "billing_hard_limit_reached"]
)
def test_a_429_for_spent_quota_stops_the_job(error_code: str) -> None:
    assert classify(status(429, error_code)) == "fatal"


@pytest.mark.parametrize("error_code", [None, "rate_limit_exceeded", "TOO_MANY_REQUESTS"])
def test_a_429_for_rate_or_overload_is_retried(error_code: str | None) -> None:
    assert classify(status(429, error_code)) == "retry"


def test_transport_and_body_errors_are_retried() -> None:
    assert classify(APIConnectionError("connect timeout")) == "retry"
    assert classify(ResponseError("stream cut off", http_status=200)) == "retry"


def test_anything_else_is_a_bug_and_stops() -> None:
    assert classify(ValueError("bug")) == "fatal"


# ---------------------------------------------------------------- the policy


async def test_429_then_ok() -> None:
    fake = FakeClock()
    attempt, calls = scripted(status(429), "done")
    assert await policy(fake).call(attempt, row_id="r1") == ("done", 2)
    assert calls[0] == 2
    assert len(fake.slept) == 1


async def test_500_then_ok_backs_off_exponentially_within_the_cap() -> None:
    fake = FakeClock()
    attempt, _ = scripted(status(500), status(502), status(503), "done")
    result = await policy(fake, initial_wait_s=1.0, max_wait_s=3.0).call(attempt, row_id="r1")
    assert result == ("done", 4)
    first, second, third = fake.slept
    assert 0.5 <= first <= 1.0
    assert 1.0 <= second <= 2.0
    assert 1.5 <= third <= 3.0  # capped at max_wait_s


async def test_without_jitter_the_waits_are_exact() -> None:
    fake = FakeClock()
    attempt, _ = scripted(status(500), status(500), "done")
    await policy(fake, initial_wait_s=2.0, jitter=False).call(attempt, row_id="r1")
    assert fake.slept == [2.0, 4.0]


async def test_retry_after_is_the_wait() -> None:
    fake = FakeClock()
    attempt, _ = scripted(status(503, headers={"retry-after": "17"}), "done")
    await policy(fake).call(attempt, row_id="r1")
    assert fake.slept == [17.0]


async def test_400_is_not_retried() -> None:
    fake = FakeClock()
    attempt, calls = scripted(status(400, "invalid_request"), "never")
    with pytest.raises(APIStatusError) as info:
        await policy(fake).call(attempt, row_id="r7")
    assert calls[0] == 1
    assert fake.slept == []
    assert info.value.row_id == "r7"
    assert info.value.attempts == 1  # type: ignore[attr-defined]


async def test_401_is_raised_at_once() -> None:
    fake = FakeClock()
    attempt, calls = scripted(status(500), status(401), "never")
    with pytest.raises(APIStatusError) as info:
        await policy(fake).call(attempt, row_id="r2")
    assert classify(info.value) == "fatal"
    assert calls[0] == 2
    assert info.value.attempts == 2  # type: ignore[attr-defined]


async def test_quota_429_is_raised_at_once() -> None:
    fake = FakeClock()
    attempt, calls = scripted(status(429, "insufficient_quota"), "never")
    with pytest.raises(APIStatusError):
        await policy(fake).call(attempt, row_id="r3")
    assert calls[0] == 1


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    fake = FakeClock()
    errors = [status(500), status(502), APIConnectionError("reset")]
    attempt, calls = scripted(*errors, "never")
    with pytest.raises(RequestError) as info:
        await policy(fake, max_attempts=3).call(attempt, row_id="r4")
    assert info.value is errors[-1]
    assert info.value.attempts == 3  # type: ignore[attr-defined]
    assert info.value.row_id == "r4"
    assert calls[0] == 3


async def test_gives_up_when_the_next_wait_would_pass_the_row_budget() -> None:
    fake = FakeClock()
    attempt, calls = scripted(*[status(503, headers={"retry-after": "30"})] * 10)
    with pytest.raises(APIStatusError) as info:
        await policy(fake, max_attempts=10, row_budget_s=100.0).call(attempt, row_id="r5")
    assert fake.slept == [30.0, 30.0, 30.0]  # a fourth wait would end at 120 s
    assert info.value.attempts == 4  # type: ignore[attr-defined]
    assert calls[0] == 4


async def test_other_exceptions_propagate_untouched() -> None:
    fake = FakeClock()
    attempt, calls = scripted(KeyError("bug"))
    with pytest.raises(KeyError):
        await policy(fake).call(attempt, row_id="r6")
    assert calls[0] == 1


async def test_with_a_limiter_a_429_waits_only_a_short_jitter() -> None:
    from batch.limiter import Limiter

    fake = FakeClock()
    limiter = Limiter(clock=fake.clock, sleep=fake.sleep)
    retry = RetryPolicy(
        RetrySettings(initial_wait_s=1.0), sleep=fake.sleep, clock=fake.clock, limiter=limiter
    )
    attempt, _ = scripted(status(429, headers={"retry-after": "20"}), "done")
    await retry.call(attempt, row_id="r1")
    assert len(fake.slept) == 1
    assert fake.slept[0] <= 0.1  # the limiter's pause does the waiting


async def test_each_retry_is_logged_once_without_the_message(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeClock()
    secret = "Bearer sk-secret-key"
    attempt, _ = scripted(
        APIStatusError(f"bad {secret}", http_status=429, code="rate_limit_exceeded"),
        APIConnectionError(f"reset {secret}"),
        "done",
    )
    with caplog.at_level(logging.INFO, logger="batch.retry"):
        await policy(fake).call(attempt, row_id="row-42")
    lines = [r.getMessage() for r in caplog.records if r.name == "batch.retry"]
    assert len(lines) == 2
    assert "row-42" in lines[0] and "attempt 1" in lines[0] and "HTTP 429 rate_limit_exceeded" in lines[0]
    assert "APIConnectionError" in lines[1] and "attempt 2" in lines[1]
    assert all("secret" not in line for line in lines)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RetrySettings(max_attempts=0)

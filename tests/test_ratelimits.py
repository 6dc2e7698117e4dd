"""Reading rate-limit headers (batch.ratelimits): Retry-After, reset durations, x-ratelimit-* numbers."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from batch.ratelimits import has_rate_headers, header_number, parse_duration, retry_after


def test_retry_after_seconds() -> None:
    assert retry_after({"retry-after": "7"}) == 7.0
    assert retry_after({"retry-after": "1.5"}) == 1.5


def test_retry_after_http_date() -> None:
    when = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    now = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert retry_after({"retry-after": format_datetime(when, usegmt=True)}, lambda: now) == 30.0
    assert retry_after({"retry-after": format_datetime(when, usegmt=True)}, lambda: now + 60) == 0.0


def test_retry_after_ms_wins() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25


@pytest.mark.parametrize("headers", [{}, {"retry-after": "soon"}, {"retry-after": "nan"}, {"retry-after-ms": "x"}])
def test_retry_after_absent_or_garbage(headers: dict[str, str]) -> None:
    assert retry_after(headers) is None


def test_negative_retry_after_means_now() -> None:
    assert retry_after({"retry-after": "-3"}) == 0.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5s", 1.5), ("1h2m3s", 3723.0), ("2", 2.0)],
)
def test_parse_duration_reads_openai_reset_format(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "1s2"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


def test_rate_headers_are_numbers_and_known_names() -> None:
    headers = {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-requests": "-1", "x-other": "1"}
    assert has_rate_headers(headers)
    assert header_number(headers, "x-ratelimit-limit-tokens") == 6000.0
    assert header_number(headers, "x-ratelimit-remaining-requests") is None  # negative: not a budget
    assert header_number({"x-ratelimit-limit-tokens": "inf"}, "x-ratelimit-limit-tokens") is None
    assert not has_rate_headers({"retry-after": "1", "x-ratelimit-reset-requests": "1s"})

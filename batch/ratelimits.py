"""Read what a server says about its rate limits: ``Retry-After`` and ``x-ratelimit-*``.

A leaf: it imports nothing from the package, so the limiter and the retry policy
both read headers here without importing each other.

``Retry-After`` (seconds or an HTTP date) and ``retry-after-ms``, also under a
gateway's prefix (LiteLLM forwards them as ``llm_provider-retry-after``).
``x-ratelimit-limit-*`` / ``-remaining-*`` (numbers) and ``-reset-*`` (an
OpenAI duration such as ``6m0s`` or ``20ms``), for ``requests`` and ``tokens``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

__all__ = ["has_rate_headers", "header_duration", "header_number", "parse_duration", "retry_after"]

# Where gateways put the provider's Retry-After: LiteLLM forwards it as llm_provider-retry-after.
_RETRY_AFTER_PREFIXES: tuple[str, ...] = ("", "llm_provider-")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)?")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

_RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


def retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time
) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, or ``Retry-After`` in
    seconds or as an HTTP date (compared with ``now()``, a wall clock), also under
    a gateway's prefix (LiteLLM's ``llm_provider-retry-after``). ``None`` when
    absent or unparseable; never negative.
    """
    for prefix in _RETRY_AFTER_PREFIXES:
        wait = _retry_after(headers.get(prefix + "retry-after-ms"), headers.get(prefix + "retry-after"), now)
        if wait is not None:
            return wait
    return None


def _retry_after(ms_value: str | None, value: str | None, now: Callable[[], float]) -> float | None:
    if ms_value is not None:
        try:
            ms = float(ms_value)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms):
            return max(0.0, ms / 1000.0)
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if date.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        return max(0.0, date.timestamp() - now())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset duration ("1s", "6m0s", "20ms", "1h2m3.5s", "1.5").

    A bare number is seconds. Anything unparseable gives ``None``.
    """
    text = text.strip()
    if not text:
        return None
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        unit = match.group(2)
        if unit is None and (pos != 0 or match.end() != len(text)):
            return None
        total += float(match.group(1)) * _UNITS[unit or "s"]
        pos = match.end()
    return total


def header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A finite, non-negative number in header ``name`` (``x-ratelimit-limit-tokens``); else ``None``."""
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def header_duration(headers: Mapping[str, str], name: str) -> float | None:
    """Seconds in a duration header (``x-ratelimit-reset-requests: 6m0s``); else ``None``."""
    value = headers.get(name)
    return None if value is None else parse_duration(value)


def has_rate_headers(headers: Mapping[str, str]) -> bool:
    """Whether an answer carries any ``x-ratelimit-limit-*`` or ``-remaining-*`` header."""
    return any(name in headers for name in _RATE_HEADERS)

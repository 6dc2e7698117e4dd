"""When an answer was made: the ``created`` field in the shapes servers send it (part of the wire).

Unix seconds (a number or a string of digits), ISO 8601, and Go's ``time.String()``
become an aware UTC datetime; anything else is None. A leaf: it imports nothing
from the package.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Final

__all__ = ["parse_created"]


# ISO 8601 ("2021-01-01T00:00:00Z") and Go's time.String() ("2021-01-01 00:00:00 +0000 UTC",
# possibly with nanoseconds and a trailing zone name or monotonic reading, which are ignored).
_DATE_RE: Final = re.compile(
    r"\s*(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?",
    re.ASCII | re.IGNORECASE,
)


@lru_cache(maxsize=64)  # answers in the same second carry the same string
def _parse_created_str(text: str) -> datetime | None:
    stripped = text.strip()
    if stripped.isascii() and stripped.isdigit():
        return datetime.fromtimestamp(int(stripped), UTC)
    match = _DATE_RE.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz: timezone = UTC
    if offset is not None and offset.upper() != "Z":
        digits = offset[1:].replace(":", "")
        delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
        tz = timezone(-delta if offset[0] == "-" else delta)
    moment = datetime(
        int(year),
        int(month),
        int(day),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        int((fraction or "0")[:6].ljust(6, "0")),
        tzinfo=tz,
    )
    return moment if tz is UTC else moment.astimezone(UTC)


@lru_cache(maxsize=64)  # the same second again and again, as with strings
def _from_timestamp(value: int | float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def parse_created(value: object) -> datetime | None:
    """``created`` as an aware UTC datetime: Unix seconds, ISO 8601, or Go's format; else None."""
    try:
        if isinstance(value, str):
            return _parse_created_str(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _from_timestamp(value)
    except (ValueError, OverflowError, OSError):
        return None
    return None

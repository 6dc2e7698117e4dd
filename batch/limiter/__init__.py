"""Keep a job within its request and token rate limits (moved into a package; split next)."""

from batch.limiter.limiter import (
    Limiter,
    LimiterStats,
    Reservation,
    _has_rate_headers,
    answer_tokens,
    content_chars,
    estimate_tokens,
    parse_duration,
    prompt_tokens,
    tokens_for,
)

__all__ = [
    "Limiter",
    "LimiterStats",
    "Reservation",
    "_has_rate_headers",
    "answer_tokens",
    "content_chars",
    "estimate_tokens",
    "parse_duration",
    "prompt_tokens",
    "tokens_for",
]

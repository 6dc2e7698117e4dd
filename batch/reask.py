"""A structured row's answers: each one checked against the job's schema, a broken one asked
again (by the retry policy) and paid for all the same (see :mod:`batch.worker`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from batch.client import Reply
from batch.errors import InvalidOutputError
from batch.records import Request, Usage
from batch.structured import Invalid, OutputFormat

__all__ = ["checked", "paid"]


async def checked(attempt: Callable[[Request], Awaitable[Reply]], request: Request, fmt: OutputFormat,
                  invalid: list[Reply]) -> tuple[Reply, Any]:
    """One attempt at a structured row: the answer parsed and validated, or InvalidOutputError
    (asked again by the retry policy; ``final`` once ``output.parse_attempts`` re-asks are spent).
    Every answer that broke the schema is appended to ``invalid``: it was paid for."""
    reply = await attempt(request)
    text = reply.completion.text
    try:
        return reply, fmt.validator.parse(text)
    except Invalid as exc:
        invalid.append(reply)
        raise InvalidOutputError(
            f"the answer does not follow the schema at {exc.pointer}: {exc.message}",
            pointer=exc.pointer, raw=text, reply=reply, final=len(invalid) > fmt.parse_attempts, kind=exc.kind,
        ) from None


def paid(replies: list[Reply]) -> Usage | None:
    """The usage of several answers to one row, summed (None when none of them reported any)."""
    usages = [r.completion.usage for r in replies if r.completion.usage is not None]
    if not usages:
        return None
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        total_tokens=sum(u.total_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens or 0 for u in usages),
        reasoning_tokens=sum(u.reasoning_tokens or 0 for u in usages),
    )

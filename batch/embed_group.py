"""Embedding rows sent several to a request: ``input.embed_batch`` rows, within ``input.embed_max_tokens``.

The feeder hands each embeddings row's request to :class:`EmbedGroups`; a group
comes back full (or at the end of the input) as one :class:`~batch.records.Request`
whose ``body["input"]`` is its rows' inputs in order and whose ``group`` is the
rows themselves. The worker splits the answer back into one result per row
(:func:`split_usage`). Lines of an OpenAI batch file are never grouped: they are
sent as given.
"""

from __future__ import annotations

import msgspec

from batch.records import Request, Usage

__all__ = ["EmbedGroups", "split_usage"]


class EmbedGroups:
    """Gathers embeddings requests into groups of up to ``size`` rows and ``max_tokens`` estimated tokens.

    Only requests of one variant and sample (so one model, one target) share a group.
    """

    def __init__(self, size: int, max_tokens: int) -> None:
        self.size = size
        self.max_tokens = max_tokens
        self._held: dict[tuple[str | None, int], _Held] = {}

    def add(self, request: Request) -> Request | None:
        """Hold ``request``; a group to send when it is full (the one before, if this would not fit)."""
        held = self._held.setdefault((request.variant, request.sample), _Held())
        out = None
        if held.requests and held.tokens + request.est_prompt_tokens > self.max_tokens:
            out = held.take()
        held.requests.append(request)
        held.tokens += request.est_prompt_tokens
        # a flush above left one row held, so a group is full here only when nothing was flushed
        if out is None and len(held.requests) >= self.size:
            return held.take()
        return out

    def flush(self) -> list[Request]:
        """Every group still held, each as one request (a single row as itself)."""
        out = [r for held in self._held.values() if (r := held.take()) is not None]
        self._held.clear()
        return out


class _Held:
    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.tokens = 0

    def take(self) -> Request | None:
        held, self.requests, self.tokens = self.requests, [], 0
        if len(held) <= 1:
            return held[0] if held else None
        first = held[0]
        body = {**first.body, "input": [r.body["input"] for r in held]}
        return msgspec.structs.replace(first, body=body, est_prompt_tokens=sum(r.est_prompt_tokens for r in held),
                                       fingerprint="", group=tuple(held))


def split_usage(usage: Usage | None, weights: list[int]) -> list[Usage | None]:
    """A batched request's usage split over its rows in proportion to their estimated tokens.

    Whole tokens, largest remainder first, so the rows' shares add up to the request's usage.
    """
    if usage is None:
        return [None] * len(weights)
    total_weight = sum(weights) or len(weights)
    weights = weights if sum(weights) else [1] * len(weights)
    shares = _apportion(usage.prompt_tokens, weights, total_weight)
    totals = _apportion(usage.total_tokens, weights, total_weight)
    return [Usage(prompt_tokens=p, completion_tokens=0, total_tokens=t) for p, t in zip(shares, totals, strict=True)]


def _apportion(amount: int, weights: list[int], total_weight: int) -> list[int]:
    exact = [amount * w / total_weight for w in weights]
    parts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: amount - sum(parts)]:
        parts[i] += 1
    return parts

"""Small frozen records that travel through the pipeline, one per row and stage.

msgspec Structs, not dataclasses: a frozen dataclass sets each field through
``object.__setattr__`` (several times slower to make: README, Performance),
and records that never hold a cycle need not be tracked by the cyclic collector.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

__all__ = ["OUTPUT_COLUMNS", "Choice", "Completion", "Request", "Result", "Row", "Usage"]

#: The columns promptmill writes for every row, in output order, after the id and
#: the pass-through columns (their Arrow types are ``batch.store.RESULT_FIELDS``).
OUTPUT_COLUMNS = (
    "model", "endpoint", "status", "text", "refusal", "finish_reason",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
    "cost_usd", "latency_s", "ttft_s", "attempts", "http_status", "error_code", "error",
    "response_id", "created", "system_fingerprint", "request_fingerprint",
    "variant", "sample", "params", "finished_at",
)


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Token counts as the server reported them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class Choice(msgspec.Struct, frozen=True, gc=False):
    """One further choice of an answer asked with ``n`` (``sample_mode = "n"``)."""

    text: str | None
    finish_reason: str | None
    refusal: str | None = None


class Completion(msgspec.Struct, frozen=True, gc=False):
    """A parsed successful answer (non-streamed body or an assembled stream).

    An embeddings answer has no text: ``vectors`` holds its vectors in input order.
    """

    text: str | None  # None when the model refused (then ``refusal`` holds why)
    finish_reason: str | None
    response_id: str | None
    model: str | None
    created: datetime | None
    system_fingerprint: str | None
    usage: Usage | None
    ttft_s: float | None = None
    refusal: str | None = None
    # choices 1 .. n-1 of a request asked with n (sample_mode = "n"; None: not sent), else empty
    more: tuple[Choice | None, ...] = ()
    vectors: list[list[float]] | None = None


class Row(msgspec.Struct, frozen=True, gc=False):
    """One input row as the reader yields it.

    ``index`` is the 0-based position in the input; ``line`` the 1-based line of a
    JSONL file (or the 1-based row number of a Parquet file) for error messages.
    ``values`` holds the columns the job uses (template fields and pass-through).
    ``error`` is set on a row that cannot be sent (``on_bad_line = "fail_row"``):
    the one-line reason, file, line and column; such a row has no prompt or messages.
    """

    index: int
    line: int
    id: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    values: Mapping[str, Any]
    error: str | None = None
    # a line of an OpenAI batch file: its body (sent as given) and its endpoint
    body: dict[str, Any] | None = None
    endpoint: str | None = None


class Request(msgspec.Struct, frozen=True, gc=False):
    """What the job sends for one row."""

    index: int
    id: str
    body: dict[str, Any]
    passthrough: Mapping[str, Any]
    est_prompt_tokens: int
    fingerprint: str
    endpoint: str = ""  # "" is the job's; a batch file's line names its own
    # embeddings sent together: one request for these rows, its ``body["input"]`` their inputs in order
    group: tuple[Request, ...] = ()
    variant: str | None = None  # the variant's name (batch.variants); None outside a run
    sample: int = 0
    lane: int = 0  # which target's workers send it
    choices: int = 1  # sample_mode = "n": one request answers samples 0 .. choices - 1


class Result(msgspec.Struct, frozen=True, gc=False):
    """The outcome of one row, as written to the output."""

    index: int
    id: str
    passthrough: Mapping[str, Any]
    fingerprint: str
    model: str
    endpoint: str
    status: str  # "ok" or "failed"
    text: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 0
    http_status: int | None = None
    error_code: str | None = None
    error: str | None = None
    response_id: str | None = None
    created: datetime | None = None
    system_fingerprint: str | None = None
    # written only when the job asks for them (see ``batch.store.schema.EXTRA_FIELDS``)
    embedding: list[float] | None = None
    response_body: str | None = None
    request_id: str | None = None
    variant: str | None = None
    sample: int | None = None
    params: str | None = None  # the variant's parameters as JSON text
    finished_at: datetime | None = None  # when the row was stored (UTC)
    # structured output only: the parsed answer's column values, and how many answers broke the schema
    columns: Mapping[str, Any] | None = None
    invalid_answers: int = 0

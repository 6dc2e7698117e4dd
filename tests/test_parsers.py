"""The pure wire parsers (batch.wire), fed bytes with no network: every ``created``
format, tolerated and missing fields, error bodies, and fuzzing (anything in, a
``Completion`` or a ``ResponseError`` out). Providers' quirks are in tests/test_wire.py;
the client over httpx.MockTransport in tests/test_client.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.errors import ResponseError
from batch.records import Completion, Usage
from batch.wire import StreamAssembler, error_text, parse_completion
from tests.wire_seeds import CHAT_RESPONSE, NEW_YEAR_2021

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


# -- parsing quirks --------------------------------------------------------


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (1609459200, NEW_YEAR_2021),
        (1609459200.0, NEW_YEAR_2021),
        ("2021-01-01T00:00:00Z", NEW_YEAR_2021),
        ("2021-01-01T02:00:00+02:00", NEW_YEAR_2021),
        ("2021-01-01 00:00:00 +0000 UTC", NEW_YEAR_2021),
        ("2021-01-01 00:00:00.5 +0000 UTC m=+0.000000001", datetime(2021, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("1609459200", NEW_YEAR_2021),
        ("yesterday", None),
        ("2021-02-30T00:00:00Z", None),
        (None, None),
        (True, None),
        (1e300, None),
        ({"when": 1}, None),
    ],
)
def test_created_in_every_format(created: Any, expected: datetime | None) -> None:
    completion = parse_completion(orjson.dumps({**CHAT_RESPONSE, "created": created}), "chat")
    assert completion.created == expected


def test_unknown_fields_and_null_details_are_tolerated() -> None:
    payload = {
        **CHAT_RESPONSE,
        "response_hash": "abc",
        "signature": {"sig": [1, 2]},
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": None},
            "completion_tokens_details": None,
            "brand_new": 3,
        },
        "choices": [{**CHAT_RESPONSE["choices"][0], "logprobs": None, "stop_reason": None}],
    }
    completion = parse_completion(orjson.dumps(payload), "chat")
    assert completion.usage == Usage(9, 12, 21, cached_tokens=None, reasoning_tokens=None)


def test_optional_fields_may_be_missing() -> None:
    completion = parse_completion(b'{"choices":[{"message":{"role":"assistant","content":null}}]}', "chat")
    assert completion == Completion("", None, None, None, None, None, None)


def test_total_tokens_is_summed_when_missing() -> None:
    payload = {**CHAT_RESPONSE, "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert parse_completion(orjson.dumps(payload), "chat").usage == Usage(2, 3, 5)


# -- error bodies ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}}', ("TOO_MANY_REQUESTS", "Too many requests")),
        (b'{"error": {"type": "invalid_request_error", "code": null, "message": "bad"}}', ("invalid_request_error", "bad")),
        (b'{"error": "overloaded", "code": 503}', ("503", "overloaded")),
        (b'{"detail": [{"loc": ["body"], "msg": "field required"}]}', (None, '[{"loc":["body"],"msg":"field required"}]')),
        (b"<html><title>502 Bad Gateway</title><body>nginx</body></html>", (None, "502 Bad Gateway")),
        (b"<p>upstream   <b>down</b></p>", (None, "upstream down")),
        (b"  plain\ntext  ", (None, "plain text")),
        (b"", (None, None)),
    ],
)
def test_error_text_in_every_shape(body: bytes, expected: tuple[str | None, str | None]) -> None:
    assert error_text(body) == expected


# -- fuzzing: anything in, a Completion or a ResponseError out -------------

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.lists(st.integers(-5, 5), max_size=2)
).map(lambda value: value)  # one branch of a "|", so well-formed values stay common
usage_shapes = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": st.integers(0, 10**6) | leaf,
        "completion_tokens": st.integers(0, 10**6) | leaf,
        "total_tokens": leaf,
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": leaf}) | leaf,
        "completion_tokens_details": st.fixed_dictionaries({}, optional={"reasoning_tokens": leaf}) | leaf,
    },
)
content = st.text(max_size=8) | leaf | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": leaf}), max_size=2)
choice_shapes = st.fixed_dictionaries(
    {},
    optional={
        "index": st.sampled_from([0, 1]) | leaf,
        "message": st.fixed_dictionaries({}, optional={"content": content}) | leaf,
        "delta": st.fixed_dictionaries({}, optional={"content": content}) | leaf,
        "text": content,
        "finish_reason": st.sampled_from(["stop", "length"]) | leaf,
    },
)
error_shapes = st.fixed_dictionaries({}, optional={"code": leaf, "type": leaf, "message": leaf}) | leaf
other_fields = {
    "usage": usage_shapes | leaf,
    "created": leaf | st.sampled_from(["2021-01-01T00:00:00Z", "2021-01-01 00:00:00 +0000 UTC"]),
    "id": leaf,
    "model": leaf,
    "system_fingerprint": leaf,
    "error": error_shapes,
}
shaped_objects = st.fixed_dictionaries(
    {"choices": st.lists(choice_shapes, min_size=1, max_size=2)}, optional=other_fields
) | st.fixed_dictionaries({}, optional={"choices": st.lists(choice_shapes, max_size=2) | leaf, **other_fields})
shaped = shaped_objects | leaf
stream_chunks = st.fixed_dictionaries(
    {}, optional={"choices": st.lists(choice_shapes, max_size=2), "usage": usage_shapes | st.none(), "id": leaf}
)


def _only_response_errors(call: Callable[[], Completion]) -> None:
    try:
        assert isinstance(call(), Completion)
    except ResponseError as exc:
        assert str(exc)


@FUZZ
@given(data=st.binary(max_size=200), endpoint=st.sampled_from(["chat", "completions"]))
def test_fuzz_parse_completion_bytes(data: bytes, endpoint: str) -> None:
    _only_response_errors(lambda: parse_completion(data, endpoint))


@FUZZ
@given(payload=shaped, endpoint=st.sampled_from(["chat", "completions"]))
def test_fuzz_parse_completion_shapes(payload: Any, endpoint: str) -> None:
    _only_response_errors(lambda: parse_completion(orjson.dumps(payload), endpoint))


def _assemble(events: list[str], endpoint: str) -> Completion:
    assembler = StreamAssembler(endpoint, clock=lambda: 1.0)
    for event in events:
        assembler.feed(event)
    return assembler.finish()


@FUZZ
@given(events=st.lists(st.text(max_size=40), max_size=6), endpoint=st.sampled_from(["chat", "completions"]))
def test_fuzz_stream_assembler_text(events: list[str], endpoint: str) -> None:
    _only_response_errors(lambda: _assemble(events, endpoint))


@settings(FUZZ, max_examples=100)
@given(
    chunks=st.lists(stream_chunks | shaped_objects | st.just("[DONE]"), max_size=4),
    endpoint=st.sampled_from(["chat", "completions"]),
)
def test_fuzz_stream_assembler_shapes(chunks: list[Any], endpoint: str) -> None:
    events = [c if c == "[DONE]" else orjson.dumps(c).decode() for c in chunks]
    _only_response_errors(lambda: _assemble(events, endpoint))


@FUZZ
@given(
    pieces=st.lists(st.text(max_size=10), max_size=5),
    done=st.booleans(),
    endpoint=st.sampled_from(["chat", "completions"]),
)
def test_fuzz_well_formed_streams_reassemble_exactly(pieces: list[str], done: bool, endpoint: str) -> None:
    def choice(piece: str | None, finish: str | None = None) -> dict[str, Any]:
        field = {"delta": {"content": piece}} if endpoint == "chat" else {"text": piece}
        return {"index": 0, "finish_reason": finish, **field}

    chunks = [{"id": "x", "choices": [choice(piece)]} for piece in pieces]
    chunks += [{"id": "x", "choices": [choice(None, "stop")]}, {"id": "x", "choices": [], "usage": USAGE}]
    events = [orjson.dumps(chunk).decode() for chunk in chunks] + (["[DONE]"] if done else [])
    completion = _assemble(events, endpoint)
    assert completion.text == "".join(pieces)
    assert completion.usage == Usage(5, 3, 8)
    assert completion.ttft_s == (1.0 if "".join(pieces) else None)

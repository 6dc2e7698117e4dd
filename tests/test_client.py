"""The client against httpx.MockTransport: every wire shape in the seeds, every error class."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import orjson
import pytest

from batch.client import Client, Reply, Timeouts
from batch.errors import APIConnectionError, APIStatusError, RequestError, ResponseError
from batch.records import Completion, Usage
from tests.wire_seeds import (
    CHAT_CHUNK,
    CHAT_RESPONSE,
    COMPLETIONS_CHUNK,
    COMPLETIONS_RESPONSE,
    MODEL,
    NEW_YEAR_2021,
)

BASE = "https://api.test/v1"
KEY = "sk-secret-0123456789abcdef"

Handler = Callable[[httpx.Request], Any]


def make_client(handler: Handler, *, endpoint: str = "chat", stream: bool = False, **kwargs: Any) -> Client:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("concurrency", 4)
    return Client(BASE, endpoint=endpoint, stream=stream, transport=httpx.MockTransport(handler), **kwargs)


def json_reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=payload, headers=headers)

    return handler


def raw_reply(body: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return handler


def sse(*chunks: Any, done: bool = True, keepalive: bool = False) -> bytes:
    lines = []
    for chunk in chunks:
        if keepalive:
            lines.append(b": keep-alive\n\n")
        lines.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if done:
        lines.append(b"data: [DONE]\n\n")
    return b"".join(lines)


def sse_reply(body: bytes) -> Handler:
    return raw_reply(body, content_type="text/event-stream; charset=utf-8")


def chat_chunk(content: str | None = None, finish: str | None = None, usage: Any = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
USAGE_CHUNK = {"id": "chatcmpl-9", "choices": [], "usage": USAGE}


async def complete(handler: Handler, body: dict[str, Any] | None = None, **kwargs: Any) -> Reply:
    async with make_client(handler, **kwargs) as client:
        return await client.complete(body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]})


async def failure(handler: Handler, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        await complete(handler, **kwargs)
    assert KEY not in str(info.value)
    return info.value


# -- the seeds -------------------------------------------------------------


async def test_chat_seed() -> None:
    reply = await complete(json_reply(CHAT_RESPONSE))
    assert reply.http_status == 200
    assert reply.completion == Completion(
        text="Hello! How can you help me today?",
        finish_reason="stop",
        response_id="chatcmpl-123",
        model=MODEL,
        created=datetime(2023, 3, 1, 6, 31, 28, tzinfo=UTC),
        system_fingerprint="fp_44709d6fcb",
        usage=Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21),
    )


async def test_completions_seed() -> None:
    reply = await complete(
        json_reply(COMPLETIONS_RESPONSE), body={"model": "m", "prompt": "hi"}, endpoint="completions"
    )
    completion = reply.completion
    assert completion.text == "This is a test"
    assert completion.created == NEW_YEAR_2021
    assert completion.usage == Usage(10, 10, 20, cached_tokens=10, reasoning_tokens=10)
    assert completion.system_fingerprint == "system-fingerprint"


async def test_chat_stream_seed_chunk_with_usage_in_every_chunk() -> None:
    body = sse(CHAT_CHUNK, {**CHAT_CHUNK, "choices": [{"delta": {"content": "!"}, "index": 0, "finish_reason": "stop"}]})
    reply = await complete(sse_reply(body), stream=True)
    assert reply.completion.text == "Hello!"
    assert reply.completion.finish_reason == "stop"
    assert reply.completion.usage == Usage(9, 12, 21, cached_tokens=10)
    assert reply.completion.response_id == "chatcmpl-123"


async def test_completions_stream_seed_with_go_style_created() -> None:
    first = {**COMPLETIONS_CHUNK, "choices": [{"index": 0, "text": "This is ", "finish_reason": None}]}
    final = {**COMPLETIONS_CHUNK, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}}
    body = sse(first, {**COMPLETIONS_CHUNK, "choices": [{"index": 0, "text": "a test", "finish_reason": "stop"}]}, final, done=False)
    reply = await complete(sse_reply(body), body={"model": "m", "prompt": "x"}, endpoint="completions", stream=True)
    assert reply.completion.text == "This is a test"
    assert reply.completion.created == NEW_YEAR_2021
    assert reply.completion.usage == Usage(4, 4, 8)


# -- requests as sent ------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "path"), [("chat", "/v1/chat/completions"), ("completions", "/v1/completions")])
@pytest.mark.parametrize("stream", [False, True])
async def test_request_url_headers_and_stream_flags(endpoint: str, path: str, stream: bool) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if stream:
            return sse_reply(sse(USAGE_CHUNK))(request)
        return httpx.Response(200, json=COMPLETIONS_RESPONSE if endpoint == "completions" else CHAT_RESPONSE)

    body = {"model": "m", "prompt": "hi", "max_tokens": 16}
    await complete(handler, body=body, endpoint=endpoint, stream=stream)
    (request,) = seen
    assert request.method == "POST"
    assert request.url.path == path
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    sent = orjson.loads(request.content)
    if stream:
        assert sent == {**body, "stream": True, "stream_options": {"include_usage": True}}
    else:
        assert sent == body
    assert body == {"model": "m", "prompt": "hi", "max_tokens": 16}  # the caller's dict is untouched


async def test_no_authorization_header_without_a_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CHAT_RESPONSE)

    await complete(handler, api_key=None)
    assert "authorization" not in seen[0].headers


async def test_reply_carries_headers_and_latency_from_the_injected_clock() -> None:
    ticks = iter([10.0, 10.75])
    headers = {"x-ratelimit-remaining-requests": "99", "X-RateLimit-Reset-Tokens": "6m0s"}
    reply = await complete(json_reply(CHAT_RESPONSE, headers=headers), clock=lambda: next(ticks))
    assert reply.headers["x-ratelimit-remaining-requests"] == "99"
    assert reply.headers["x-ratelimit-reset-tokens"] == "6m0s"
    assert reply.latency_s == pytest.approx(0.75)


# -- streams ---------------------------------------------------------------


@pytest.mark.parametrize("done", [True, False], ids=["DONE", "EOF"])
@pytest.mark.parametrize("keepalive", [False, True], ids=["plain", "keepalive"])
@pytest.mark.parametrize("usage_every_chunk", [False, True], ids=["final-usage", "usage-each"])
async def test_chat_stream_shapes(done: bool, keepalive: bool, usage_every_chunk: bool) -> None:
    partial = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    each = partial if usage_every_chunk else None
    chunks = [
        chat_chunk("", usage=each, system_fingerprint="fp_1"),
        chat_chunk("Hel", usage=each),
        chat_chunk("lo", usage=each),
        chat_chunk(None, finish="length", usage=USAGE if usage_every_chunk else None),
    ]
    if not usage_every_chunk:
        chunks.append(USAGE_CHUNK)
    reply = await complete(sse_reply(sse(*chunks, done=done, keepalive=keepalive)), stream=True)
    assert reply.completion.text == "Hello"
    assert reply.completion.finish_reason == "length"
    assert reply.completion.usage == Usage(5, 3, 8)
    assert reply.completion.response_id == "chatcmpl-9"
    assert reply.completion.system_fingerprint == "fp_1"
    assert reply.completion.created == datetime.fromtimestamp(1700000000, UTC)


async def test_stream_ttft_measured_with_the_injected_clock() -> None:
    now = [100.0]

    async def body() -> AsyncIterator[bytes]:
        now[0] = 100.1
        yield sse(chat_chunk("", extra_role="assistant"), done=False)
        now[0] = 100.5
        yield sse(chat_chunk("Hi"), done=False)
        now[0] = 102.0
        yield sse(chat_chunk(None, finish="stop"), USAGE_CHUNK)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    reply = await complete(handler, stream=True, clock=lambda: now[0])
    assert reply.completion.ttft_s == pytest.approx(0.5)
    assert reply.latency_s == pytest.approx(2.0)
    assert reply.completion.text == "Hi"


async def test_non_stream_has_no_ttft() -> None:
    assert (await complete(json_reply(CHAT_RESPONSE))).completion.ttft_s is None


async def test_stream_answered_with_a_json_body_is_parsed() -> None:
    reply = await complete(json_reply(CHAT_RESPONSE), stream=True)
    assert reply.completion.text == "Hello! How can you help me today?"


async def test_only_choice_zero_is_assembled() -> None:
    chunks = [
        {"choices": [{"index": 1, "delta": {"content": "other"}}, {"index": 0, "delta": {"content": "mine"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}, {"index": 1, "delta": {}, "finish_reason": "length"}]},
    ]
    reply = await complete(sse_reply(sse(*chunks)), stream=True)
    assert (reply.completion.text, reply.completion.finish_reason) == ("mine", "stop")


# -- errors ----------------------------------------------------------------


async def test_429_with_json_error_and_rate_limit_headers() -> None:
    headers = {"retry-after": "2", "x-ratelimit-remaining-requests": "0"}
    error = await failure(
        json_reply({"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}}, 429, headers)
    )
    assert isinstance(error, APIStatusError)
    assert (error.http_status, error.code) == (429, "TOO_MANY_REQUESTS")
    assert str(error) == "HTTP 429 (TOO_MANY_REQUESTS): Too many requests"
    assert error.headers["Retry-After"] == "2"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"


async def test_openai_quota_error_shape() -> None:
    body = {"error": {"type": "insufficient_quota", "code": "insufficient_quota", "param": None, "message": "You exceeded your current quota."}}
    error = await failure(json_reply(body, 429))
    assert error.code == "insufficient_quota"
    assert "exceeded your current quota" in str(error)


async def test_error_code_falls_back_to_type() -> None:
    body = {"error": {"type": "invalid_request_error", "code": None, "message": "bad"}}
    error = await failure(json_reply(body, 400))
    assert (error.http_status, error.code) == (400, "invalid_request_error")


async def test_500_with_an_html_page() -> None:
    page = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1>" + b"x" * 5000 + b"</body></html>"
    error = await failure(raw_reply(page, 500, "text/html"))
    assert isinstance(error, APIStatusError)
    assert (error.http_status, error.code) == (500, None)
    assert str(error) == "HTTP 500: 500 Internal Server Error"


async def test_long_server_message_is_truncated() -> None:
    error = await failure(json_reply({"error": {"code": "x", "message": "word " * 1000}}, 400))
    assert len(str(error)) < 400


@pytest.mark.parametrize("status", [502, 503])
async def test_empty_error_body(status: int) -> None:
    error = await failure(raw_reply(b"", status, "text/plain"))
    assert isinstance(error, APIStatusError)
    assert str(error) == f"HTTP {status} {httpx.codes.get_reason_phrase(status)}"


async def test_401_echoing_the_key_never_shows_it() -> None:
    body = {"error": {"code": "UNAUTHORIZED", "message": f"Invalid API key {KEY}, check it"}}
    error = await failure(json_reply(body, 401))
    assert error.http_status == 401
    assert "[redacted]" in str(error)


async def test_key_echoed_in_an_unusable_200_never_shows() -> None:
    error = await failure(raw_reply(f"bad key {KEY}".encode(), 200, "text/plain"))
    assert isinstance(error, ResponseError)
    assert "[redacted]" in str(error)


async def test_undecodable_gzip_body_is_a_response_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    assert isinstance(await failure(handler), ResponseError)


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"", "application/json", "empty response body"),
        (b"<html>gateway</html>", "text/html", "not valid JSON"),
        (b"[1, 2]", "application/json", "not a JSON object"),
        (orjson.dumps({**CHAT_RESPONSE, "choices": None}), "application/json", "no choices"),
        (orjson.dumps({k: v for k, v in CHAT_RESPONSE.items() if k != "choices"}), "application/json", "no choices"),
        (orjson.dumps({**CHAT_RESPONSE, "choices": []}), "application/json", "empty choices"),
        (orjson.dumps({**CHAT_RESPONSE, "choices": ["text"]}), "application/json", "not an object"),
        (orjson.dumps({**CHAT_RESPONSE, "choices": [{"index": 0}]}), "application/json", "no message"),
        (orjson.dumps({**CHAT_RESPONSE, "usage": "lots"}), "application/json", "usage is not an object"),
        (orjson.dumps({**CHAT_RESPONSE, "usage": {"prompt_tokens": "9", "completion_tokens": 1}}), "application/json", "usage.prompt_tokens"),
        (orjson.dumps({"error": {"code": "overloaded", "message": "try later"}}), "application/json", "try later"),
    ],
)
async def test_unusable_200_is_a_response_error(body: bytes, content_type: str, fragment: str) -> None:
    error = await failure(raw_reply(body, 200, content_type))
    assert isinstance(error, ResponseError)
    assert fragment in str(error)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (sse(chat_chunk("Hel"), chat_chunk("lo"), done=False), "cut off"),
        # [DONE] ends a stream with text (tests/test_wire.py), but not one with none
        (sse(chat_chunk(""), chat_chunk(finish=""), done=True), "cut off"),
        (b"", "without any answer"),
        (b": keep-alive\n\n", "without any answer"),
        (sse(chat_chunk("Hel"), done=False) + b"data: {\"choi\n\n", "not valid JSON"),
        (b"event: error\ndata: upstream exploded\n\n", "upstream exploded"),
        (sse({"error": {"code": "INTERNAL", "message": "node died"}}), "node died"),
        (sse(chat_chunk(None, finish="stop"), {"choices": [], "usage": [1]}), "usage is not an object"),
    ],
)
async def test_broken_streams_are_response_errors(body: bytes, fragment: str) -> None:
    error = await failure(sse_reply(body), stream=True)
    assert isinstance(error, ResponseError)
    assert fragment in str(error)


async def test_stream_with_wrong_content_type() -> None:
    error = await failure(raw_reply(b"data: {}\n\n", 200, "text/plain"), stream=True)
    assert isinstance(error, ResponseError)
    assert "event stream" in str(error)


async def test_declared_oversized_body_is_refused_unread() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"x" * 2000, headers={"content-type": "application/json"})

    error = await failure(handler, max_body_bytes=1000)
    assert isinstance(error, ResponseError)
    assert "limit" in str(error)


@pytest.mark.parametrize("stream", [False, True])
async def test_endless_body_stops_at_the_limit(stream: bool) -> None:
    sent = [0]

    async def endless() -> AsyncIterator[bytes]:
        if stream:
            yield b"data: "
        while True:
            sent[0] += 1
            yield b"a" * 1024  # no newline: an SSE line that never ends

    def handler(request: httpx.Request) -> httpx.Response:
        content_type = "text/event-stream" if stream else "application/json"
        return httpx.Response(200, content=endless(), headers={"content-type": content_type})

    error = await failure(handler, stream=stream, max_body_bytes=64 * 1024)
    assert isinstance(error, ResponseError)
    assert sent[0] <= 66


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "could not connect"),
        (httpx.ConnectTimeout(""), "connect timed out after 10s"),
        (httpx.ReadTimeout(""), "read timeout"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "Server disconnected"),
        (httpx.ReadError("reset by peer"), "reset by peer"),
        (ConnectionResetError(104, "Connection reset by peer"), "ConnectionResetError"),
    ],
)
async def test_transport_errors_are_connection_errors(exc: Exception, fragment: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    error = await failure(handler)
    assert isinstance(error, APIConnectionError)
    assert fragment in str(error)


async def test_stream_dropped_midway_is_a_connection_error() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield sse(chat_chunk("Hel"), done=False)
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    error = await failure(handler, stream=True)
    assert isinstance(error, APIConnectionError)


async def test_total_timeout_is_a_connection_error() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(5)
        return httpx.Response(200, json=CHAT_RESPONSE)

    error = await failure(handler, timeouts=Timeouts(total=0.05))
    assert isinstance(error, APIConnectionError)
    assert "total timeout" in str(error)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        Client(BASE, endpoint="rerank", stream=False, api_key=None, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        Client(BASE, endpoint="chat", stream=False, api_key=None, concurrency=0)

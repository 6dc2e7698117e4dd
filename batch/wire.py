"""The client stage: send one request, parse the answer, or raise a named error.

``Client.complete(body)`` posts one body to ``{base_url}/chat/completions`` or
``{base_url}/completions`` and returns a ``Reply``. The wire quirks it absorbs
(see DESIGN.md, "The wire") live in the two pure parsers, ``parse_completion``
for JSON bodies and ``StreamAssembler`` for SSE streams, so they can be tested
and fuzzed without a network.

Every failure is one of three errors from ``batch.errors``:

- ``APIStatusError``: a non-2xx status, with the server's error code and message;
- ``APIConnectionError``: connect error, timeout (per phase or total), dropped connection;
- ``ResponseError``: a 2xx answer that cannot be used (unparseable, wrong shape,
  too large, or a stream cut off before its finish_reason or usage).

Whether to retry is decided elsewhere (``batch.retry``). This module is on the
hot path of every request: it parses each body once with orjson, builds its
constant objects once per client, and logs nothing per request.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from types import TracebackType
from typing import Any, Final, cast

import anyio
import httpx
import msgspec
import orjson
from httpx_sse import EventSource, SSEError

from batch import __version__
from batch.errors import (
    APIConnectionError,
    APIStatusError,
    BadValueError,
    RequestError,
    ResponseError,
)
from batch.network import CertificateError, Transport, proxy_for
from batch.records import Completion, Usage

_log = logging.getLogger(__name__)

__all__ = ["CERTIFICATE_ERROR", "Client", "Reply", "StreamAssembler", "Timeouts", "parse_completion"]

CERTIFICATE_ERROR: Final = "certificate_verify_failed"  # the code of a TLS failure: the job stops
_PATHS: Final = {"chat": "/chat/completions", "completions": "/completions"}
_MESSAGE_CHARS: Final = 300  # the server's message is cut to this in our errors
_SNIPPET_CHARS: Final = 80  # how much of an unusable 2xx body an error quotes
_ERROR_BODY_BYTES: Final = 64 * 1024  # enough of an error body to find its message
# A token count must be below this: exact as a float (the summary's JSON, the cost) and in the int64 columns.
_MAX_COUNT: Final = 2**53

@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``read`` is the longest silence between bytes; ``total`` bounds the whole request."""

    connect: float = 10.0
    read: float = 120.0
    write: float = 30.0
    total: float = 600.0


_DEFAULT_TIMEOUTS: Final = Timeouts()


class Reply(msgspec.Struct, frozen=True, gc=False):
    """A successful answer. ``headers`` are the response's (case-insensitive), for the limiter."""

    completion: Completion
    http_status: int
    headers: Mapping[str, str]
    latency_s: float


# -- parsing ---------------------------------------------------------------


def _clip(text: str, limit: int = _MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _token_count(value: object, name: str) -> int:
    if type(value) is int and 0 <= value < _MAX_COUNT:
        return value
    if type(value) is float and 0 <= value < _MAX_COUNT and value.is_integer():
        return int(value)
    # checked here, where it enters: the same answer again would be paid again and fail the same way
    raise BadValueError(f"usage.{name} is not a token count: {_clip(repr(value), _SNIPPET_CHARS)}")


def _detail_count(details: object, name: str) -> int | None:
    # The token details are optional extras: absent, null or odd values mean "not reported";
    # a count that no column can hold is a bad answer, like one of the main counts.
    if isinstance(details, dict):
        value = details.get(name)
        if type(value) is int and value >= 0:
            if value >= _MAX_COUNT:
                raise BadValueError(f"usage.{name} is not a token count: {_clip(repr(value), _SNIPPET_CHARS)}")
            return value
    return None


def _loads_lenient(data: bytes | str) -> Any:
    """JSON with invalid UTF-8 or lone surrogates in its strings: each bad piece becomes U+FFFD.

    orjson refuses both; the standard library's parser takes the text decoded with
    replacement and keeps lone surrogate escapes, which :func:`_valid_text` replaces.
    Raises ``ValueError`` when the body is not JSON at all.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return json.loads(text)


def _valid_text(value: str | None) -> str | None:
    """``value`` with every lone surrogate replaced by U+FFFD (an output column holds valid text only)."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _parse_usage(raw: object) -> Usage | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ResponseError(f"usage is not an object: {_clip(repr(raw), _SNIPPET_CHARS)}")
    prompt = _token_count(raw.get("prompt_tokens"), "prompt_tokens")
    completion = _token_count(raw.get("completion_tokens"), "completion_tokens")
    total = raw.get("total_tokens")
    cached = _detail_count(raw.get("prompt_tokens_details"), "cached_tokens")
    if cached is None:
        cached = _detail_count(raw, "prompt_cache_hit_tokens")  # DeepSeek's name for cached input
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion if total is None else _token_count(total, "total_tokens"),
        cached_tokens=cached,
        reasoning_tokens=_detail_count(raw.get("completion_tokens_details"), "reasoning_tokens"),
    )


def _usage_of(payload: dict[str, Any]) -> object:
    """The raw usage of an answer or chunk: ``usage``, or Groq's ``x_groq.usage`` (its streams' last chunk)."""
    usage = payload.get("usage")
    if usage is None:
        extra = payload.get("x_groq")
        if isinstance(extra, dict):
            return extra.get("usage")
    return usage


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


def _content_text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content given as parts: [{"type": "text", "text": "..."}, ...]
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise ResponseError(f"{where} is not a string: {_clip(repr(content), _SNIPPET_CHARS)}")


def _choice_text(choice: dict[str, Any], chat: bool) -> tuple[str | None, str | None]:
    """(text, refusal). Chat answers carry message.content and completions answers carry
    text; a server answering in the other shape is still understood."""
    message = choice.get("message")
    if isinstance(message, dict) and (chat or "text" not in choice):
        content = message.get("content")
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            # A refusal (OpenAI) comes with a null content: no text, which is not an empty one.
            return (None if content is None else _content_text(content, "choices[0].message.content")), refusal
        return _content_text(content, "choices[0].message.content"), None
    if "text" in choice:
        return _content_text(choice["text"], "choices[0].text"), None
    if chat:
        raise ResponseError("choices[0] has no message object")
    raise ResponseError("choices[0] has no text")


def _error_in_body(payload: object) -> tuple[str | None, str | None]:
    """(code, message) from an error body in any of the shapes servers use."""
    if not isinstance(payload, dict):
        return None, None
    error = payload.get("error", payload)
    if isinstance(error, str):
        error = {"message": error, "code": payload.get("code")}
    if not isinstance(error, dict):
        return None, None
    code = error.get("code")
    if code is None or code == "":
        code = error.get("type")  # OpenAI leaves code null on some errors; type names them
    message = error.get("message")
    if message is None:
        message = error.get("detail")  # FastAPI-style {"detail": ...}
    if message is not None and not isinstance(message, str):
        message = orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS).decode()
    if isinstance(code, bool) or not isinstance(code, str | int):
        code = None
    return (None if code is None else str(code)), message


def _error_from_payload(payload: dict[str, Any], what: str) -> ResponseError:
    code, message = _error_in_body(payload)
    text = f"{what} carries an error"
    if code:
        text += f" ({_clip(code, 60)})"
    if message:
        text += f": {_clip(message)}"
    return ResponseError(text, code=code)


def _body_snippet(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: _SNIPPET_CHARS * 4].decode("utf-8", "replace")
    return _clip(" ".join(data.split()), _SNIPPET_CHARS)


def parse_completion(data: bytes, endpoint: str) -> Completion:
    """Parse a non-streamed JSON answer; raise ``ResponseError`` for anything unusable.

    Invalid UTF-8 or a lone surrogate in a string is kept as U+FFFD, as in a stream:
    a well-formed answer is never paid for twice because of a bad byte.
    """
    lenient = False
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        if not data:
            raise ResponseError("empty response body") from None
        try:
            payload = _loads_lenient(data)
        except (ValueError, RecursionError):
            raise ResponseError(f"response body is not valid JSON: {_body_snippet(data)!r}") from None
        lenient = True
    if not isinstance(payload, dict):
        raise ResponseError(f"response body is not a JSON object: {_body_snippet(data)!r}")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        if payload.get("error"):
            raise _error_from_payload(payload, "response body")
        if choices == []:
            raise ResponseError("response has an empty choices list")
        raise ResponseError("response has no choices list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise ResponseError("choices[0] is not an object")
    text, refusal = _choice_text(choice, endpoint == "chat")
    completion = Completion(
        text=text,
        finish_reason=_str_or_none(choice.get("finish_reason")) or None,
        response_id=_str_or_none(payload.get("id")),
        model=_str_or_none(payload.get("model")),
        created=parse_created(payload.get("created")),
        system_fingerprint=_str_or_none(payload.get("system_fingerprint")),
        usage=_parse_usage(_usage_of(payload)),
        refusal=refusal,
    )
    return _valid_strings(completion) if lenient else completion


def _valid_strings(c: Completion) -> Completion:
    return msgspec.structs.replace(
        c,
        text=None if c.text is None else _valid_text(c.text) or "",
        refusal=_valid_text(c.refusal),
        finish_reason=_valid_text(c.finish_reason),
        response_id=_valid_text(c.response_id),
        model=_valid_text(c.model),
        system_fingerprint=_valid_text(c.system_fingerprint),
    )


class StreamAssembler:
    """Assemble a streamed answer from the ``data`` payloads of its SSE events.

    Feed every payload in order (``[DONE]`` included, if the server sends it), then
    call ``finish``. Only choice index 0 is assembled. Given a ``clock``, the time
    from ``started`` to the first non-empty piece of text is the ``ttft_s``.
    """

    __slots__ = (
        "_chat",
        "_chunks",
        "_clock",
        "_created",
        "_done",
        "_fingerprint",
        "_finish_reason",
        "_id",
        "_lenient",
        "_model",
        "_parts",
        "_refusals",
        "_started",
        "_ttft",
        "_usage",
    )

    def __init__(
        self, endpoint: str, *, clock: Callable[[], float] | None = None, started: float = 0.0
    ) -> None:
        self._chat = endpoint == "chat"
        self._clock = clock
        self._started = started
        self._parts: list[str] = []
        self._refusals: list[str] = []
        self._chunks = 0
        self._done = False
        self._finish_reason: str | None = None
        self._id: str | None = None
        self._model: str | None = None
        self._created: object = None
        self._fingerprint: str | None = None
        self._usage: object = None  # the latest usage seen, parsed once in finish()
        self._ttft: float | None = None
        self._lenient = False  # an event held a lone surrogate: strings are made valid in finish()

    @property
    def done(self) -> bool:
        """True once ``[DONE]`` was fed."""
        return self._done

    def feed(self, data: str) -> None:
        if self._done:
            return
        data = data.strip()
        if not data:
            return
        if data == "[DONE]":
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            try:
                chunk = _loads_lenient(data)
            except (ValueError, RecursionError):
                raise ResponseError(f"stream event is not valid JSON: {_body_snippet(data)!r}") from None
            self._lenient = True
        if not isinstance(chunk, dict):
            raise ResponseError(f"stream event is not a JSON object: {_body_snippet(data)!r}")
        if chunk.get("error"):
            raise _error_from_payload(chunk, "stream")
        self._chunks += 1
        choices = chunk.get("choices")
        if choices:
            if not isinstance(choices, list):
                raise ResponseError("stream event choices is not a list")
            for choice in choices:
                if not isinstance(choice, dict):
                    raise ResponseError("stream event choice is not an object")
                index = choice.get("index")
                if index is not None and index != 0:
                    continue
                piece = self._piece(choice)
                if piece:
                    if self._ttft is None and self._clock is not None:
                        self._ttft = self._clock() - self._started
                    self._parts.append(piece)
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    self._finish_reason = reason
        elif choices is not None and not isinstance(choices, list):
            raise ResponseError("stream event choices is not a list")
        usage = _usage_of(chunk)
        if usage is not None:
            self._usage = usage
        if self._id is None:
            self._id = _str_or_none(chunk.get("id"))
        if self._model is None:
            self._model = _str_or_none(chunk.get("model"))
        if self._created is None:
            self._created = chunk.get("created")
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str):
            self._fingerprint = fingerprint

    def _piece(self, choice: dict[str, Any]) -> str:
        delta = choice.get("delta")
        if isinstance(delta, dict) and (self._chat or "text" not in choice):
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._refusals.append(refusal)
            return _content_text(delta.get("content"), "delta.content")
        if "text" in choice:
            return _content_text(choice["text"], "choices[].text")
        if delta is not None and not isinstance(delta, dict):
            raise ResponseError("stream event delta is not an object")
        return ""

    def finish(self) -> Completion:
        """The assembled answer; ``ResponseError`` if the stream ended before it was complete."""
        # [DONE] after some text ends a stream normally even with neither (TGI sends
        # finish_reason "" on every chunk and no usage).
        if self._finish_reason is None and self._usage is None and not (self._done and self._parts):
            if self._chunks == 0:
                raise ResponseError("stream ended without any answer")
            raise ResponseError("stream was cut off before its finish_reason or usage")
        refusal = "".join(self._refusals) or None
        completion = Completion(
            text=None if refusal is not None and not self._parts else "".join(self._parts),
            finish_reason=self._finish_reason,
            response_id=self._id,
            model=self._model,
            created=parse_created(self._created),
            system_fingerprint=self._fingerprint,
            usage=_parse_usage(self._usage),
            ttft_s=self._ttft,
            refusal=refusal,
        )
        return _valid_strings(completion) if self._lenient else completion


# -- the HTTP side ---------------------------------------------------------


def _error_text(body: bytes) -> tuple[str | None, str | None]:
    """(code, message) from a non-2xx body: JSON error shapes, HTML pages, plain text, nothing."""
    try:
        return _error_in_body(orjson.loads(body))
    except orjson.JSONDecodeError:
        pass
    text = body.decode("utf-8", "replace")
    if "<" in text:
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return None, text or None


class _CappedResponse:
    """What ``EventSource`` reads of a response, with the decoded bytes it yields capped.

    An SSE line is buffered until its newline, so a server streaming without one
    would otherwise grow memory without bound before any event reaches us; a
    compressed stream is counted after it is inflated.
    """

    __slots__ = ("_limit", "_response", "headers")

    def __init__(self, response: httpx.Response, limit: int) -> None:
        self._response = response
        self._limit = limit
        self.headers = response.headers

    async def aiter_text(self) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder(self._response.encoding or "utf-8")(errors="replace")
        async for chunk in _decoded_chunks(self._response, self._limit, "response stream"):
            text = decoder.decode(chunk)
            if text:
                yield text
        text = decoder.decode(b"", True)
        if text:
            yield text


class Client:
    """Sends completion requests to one OpenAI-compatible endpoint.

    One client serves a whole job: its connection pool holds ``concurrency``
    connections. ``body`` passed to ``complete`` carries no "stream" key; the
    client adds the stream flags when ``stream`` is true. The API key is sent
    as a bearer token and never appears in an error message.
    """

    def __init__(
        self,
        base_url: str,
        *,
        endpoint: str,
        stream: bool,
        api_key: str | None,
        concurrency: int,
        timeouts: Timeouts = _DEFAULT_TIMEOUTS,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.perf_counter,
        max_body_bytes: int = 32 * 2**20,
    ) -> None:
        if endpoint not in _PATHS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected 'chat' or 'completions'")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._endpoint = endpoint
        self._stream = stream
        self._api_key = api_key or None
        self._total = timeouts.total
        self._clock = clock
        self._max_body = max_body_bytes
        self._url = httpx.URL(base_url.rstrip("/") + _PATHS[endpoint])
        # Built once: every request differs only in its Content-Length. Host, Accept-Encoding
        # (what aiohttp can inflate) and keep-alive are the engine's to set.
        headers = [
            (b"Accept", b"text/event-stream" if stream else b"application/json"),
            (b"User-Agent", f"promptmill/{__version__}".encode("ascii")),
            (b"Content-Type", b"application/json"),
        ]
        if self._api_key is not None:
            headers.append((b"Authorization", f"Bearer {self._api_key}".encode()))
        self._headers: Final = headers
        self._extensions: Final = {
            "timeout": {"connect": timeouts.connect, "read": timeouts.read, "write": timeouts.write, "pool": None}
        }
        # An injected transport is the whole network; else one aiohttp session through
        # httpx-aiohttp, with the proxy the environment names (never for a loopback host).
        if transport is None:
            transport = Transport(limit=concurrency, proxy=proxy_for(self._url))
        self._transport: Final = transport
        self._timeout_messages: dict[type[httpx.TimeoutException], str] = {
            httpx.ConnectTimeout: f"connect timed out after {timeouts.connect:g}s",
            httpx.ReadTimeout: f"no data from the server for {timeouts.read:g}s (read timeout)",
            httpx.WriteTimeout: f"sending the request timed out after {timeouts.write:g}s",
            httpx.PoolTimeout: "timed out waiting for a free connection",
        }

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def complete(self, body: dict[str, Any]) -> Reply:
        """Send one request body; return the parsed answer or raise a ``RequestError``."""
        if self._stream:
            if "stream_options" in body:
                options = body["stream_options"]
                options = {**options, "include_usage": True} if isinstance(options, dict) else options
                payload = {**body, "stream": True, "stream_options": options}
            else:
                payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        elif "stream" in body or "stream_options" in body:
            payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        else:
            payload = body
        content = orjson.dumps(payload)
        started = self._clock()
        try:
            if _on_asyncio():
                # asyncio's own timeout costs half of anyio's cancel scope; same TimeoutError,
                # and an enclosing anyio cancel scope still wins when both fire.
                async with asyncio.timeout(self._total):
                    return await self._send(content, started)
            with anyio.fail_after(self._total):
                return await self._send(content, started)
        except TimeoutError:
            raise self._redact(
                APIConnectionError(f"no complete answer within {self._total:g}s (total timeout)")
            ) from None
        except httpx.TimeoutException as exc:
            message = self._timeout_messages.get(type(exc)) or f"timed out: {exc}"
            raise self._redact(APIConnectionError(message)) from exc
        except CertificateError as exc:
            raise self._redact(APIConnectionError(
                f"the TLS certificate of {self._url.host} did not verify ({_clip(str(exc), 160)}); "
                "if the server uses a private CA, point SSL_CERT_FILE at its certificate",
                code=CERTIFICATE_ERROR,
            )) from exc
        except httpx.TransportError as exc:
            raise self._redact(APIConnectionError(_transport_message(exc))) from exc
        except OSError as exc:
            # A third-party transport that lets a socket error through unwrapped.
            raise self._redact(APIConnectionError(_clip(f"{type(exc).__name__}: {exc}"))) from exc
        except httpx.DecodingError as exc:
            raise self._redact(ResponseError(f"response body could not be decoded: {exc}")) from exc
        except RequestError as exc:
            raise self._redact(exc) from None

    async def _send(self, content: bytes, started: float) -> Reply:
        # What httpx.AsyncClient.stream() does, minus its per-request work (header merging,
        # auth and redirect flows, cookies): straight to the transport, which never redirects.
        request = httpx.Request(
            "POST",
            self._url,
            headers=httpx.Headers([*self._headers, (b"Content-Length", b"%d" % len(content))]),
            content=content,
            extensions=self._extensions,
        )
        response = await self._transport.handle_async_request(request)
        try:
            response.request = request
            status = response.status_code
            if _log.isEnabledFor(logging.DEBUG):
                # the URL and status only: headers carry the key
                _log.debug("POST %s: HTTP %d after %.3f s", self._url, status, self._clock() - started)
            if not 200 <= status < 300:
                raise await self._status_error(response)
            if self._stream and "json" not in response.headers.get("content-type", ""):
                completion = await self._read_stream(response, started)
            else:
                # A non-stream request, or a server that ignored "stream": a JSON body.
                completion = parse_completion(await self._read_body(response), self._endpoint)
        finally:
            await response.aclose()
        return Reply(completion, status, response.headers, self._clock() - started)

    async def _read_body(self, response: httpx.Response) -> bytes:
        chunks = [chunk async for chunk in _decoded_chunks(response, self._max_body, "response body")]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _read_stream(self, response: httpx.Response, started: float) -> Completion:
        assembler = StreamAssembler(self._endpoint, clock=self._clock, started=started)
        source = EventSource(cast(httpx.Response, _CappedResponse(response, self._max_body)))
        try:
            async for event in source.aiter_sse():
                if event.event == "error":
                    raise ResponseError(f"stream error event: {_clip(event.data)}")
                # Read on past [DONE] to the end, so the connection can be reused.
                assembler.feed(event.data)
        except SSEError as exc:
            raise ResponseError(f"not an event stream: {exc}") from None
        return assembler.finish()

    async def _status_error(self, response: httpx.Response) -> APIStatusError:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= _ERROR_BODY_BYTES:
                    break
        except (httpx.TransportError, httpx.DecodingError):
            pass  # the status is what matters; the body was a courtesy
        code, message = _error_text(b"".join(chunks)[:_ERROR_BODY_BYTES])
        if self._api_key is not None:
            # Before clipping, so no piece of the key survives at the cut.
            code = code and code.replace(self._api_key, "[redacted]")
            message = message and message.replace(self._api_key, "[redacted]")
        status = response.status_code
        if 300 <= status < 400:
            # Never followed: the key would go to wherever the server points.
            location = response.headers.get("location", "")
            if self._api_key is not None:
                location = location.replace(self._api_key, "[redacted]")
            return APIStatusError(
                f"HTTP {status}: redirect to {_clip(location, 120) or '(no location)'} not followed; "
                "check api.base_url (its scheme, host and version prefix)",
                http_status=status, headers=response.headers,
            )
        text = f"HTTP {status}"
        shown = code if code != str(status) else None  # a gateway's code can be the status (LiteLLM's "429")
        if shown:
            text += f" ({_clip(shown, 60)})"
        if message:
            text += f": {_clip(message)}"
        elif not shown:
            text += f" {response.reason_phrase}".rstrip()
        return APIStatusError(text, http_status=status, code=code, headers=response.headers)

    def _redact(self, exc: RequestError) -> RequestError:
        key = self._api_key
        if key is None or (key not in exc.message and key not in (exc.code or "")):
            return exc
        return type(exc)(
            exc.message.replace(key, "[redacted]"),
            http_status=exc.http_status,
            code=exc.code and exc.code.replace(key, "[redacted]"),
            headers=exc.headers,
            row_id=exc.row_id,
        )


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        return False
    return True


async def _decoded_chunks(response: httpx.Response, limit: int, what: str) -> AsyncIterator[bytes]:
    """The body as it arrives, decoded, failing as soon as it passes ``limit`` bytes.

    Over the network stack the engine has inflated each chunk already (a bounded step
    at a time) and no Content-Encoding is left; a transport that leaves the body
    encoded (a test's MockTransport) gets httpx's decoder.
    """
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit and "content-encoding" not in response.headers:
        raise ResponseError(f"{what} is {length} bytes, over the {limit}-byte limit")
    chunks = (
        response.aiter_bytes()
        if "content-encoding" in response.headers
        else aiter(cast(httpx.AsyncByteStream, response.stream))
    )
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ResponseError(f"{what} is larger than {limit} bytes (after decompression)")
        yield chunk


def _transport_message(exc: httpx.TransportError) -> str:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return _clip(f"could not connect: {detail}")
    if isinstance(exc, httpx.RemoteProtocolError):
        if detail.startswith("malformed response"):
            return _clip(detail)
        return _clip(f"connection closed by the server: {detail}")
    return _clip(f"{type(exc).__name__}: {detail}")

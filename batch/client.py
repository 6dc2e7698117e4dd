"""The client stage: send one request, parse the answer, or raise a named error.

``Client.complete(body)`` posts one body to ``{base_url}/chat/completions``,
``{base_url}/completions`` or ``{base_url}/embeddings`` (the client's endpoint,
or the one a batch file's line names) and returns a ``Reply``. The wire quirks it
absorbs (see DESIGN.md, "The wire") live in the pure parsers of ``batch.wire``
(``parse_completion`` for JSON bodies, ``StreamAssembler`` for SSE streams) and
``batch.wire_embed`` (an embeddings answer's vectors, base64 decoded, and its
usage), so they can be tested and fuzzed without a network; this module is the
HTTP side, over the stack in ``batch.network``. Embeddings are never streamed.
With ``keep_body`` the answer's raw JSON is kept on the ``Reply`` (an OpenAI
batch output line holds it as the server sent it).

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
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, cast

import anyio
import httpx
import msgspec
import orjson
from httpx_sse import EventSource, SSEError

from batch import __version__
from batch.errors import APIConnectionError, APIStatusError, RequestError, ResponseError
from batch.network import CertificateError, Transport, proxy_for
from batch.records import Completion
from batch.wire import StreamAssembler, clip, error_text, parse_completion
from batch.wire_embed import parse_embeddings

_log = logging.getLogger(__name__)

__all__ = ["CERTIFICATE_ERROR", "Client", "Reply", "Timeouts"]

CERTIFICATE_ERROR: Final = "certificate_verify_failed"  # the code of a TLS failure: the job stops
_PATHS: Final = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
_ERROR_BODY_BYTES: Final = 64 * 1024  # enough of an error body to find its message


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``read`` is the longest silence between bytes; ``total`` bounds the whole request."""

    connect: float = 10.0
    read: float = 120.0
    write: float = 30.0
    total: float = 600.0


_DEFAULT_TIMEOUTS: Final = Timeouts()


class Reply(msgspec.Struct, frozen=True, gc=False):
    """A successful answer. ``headers`` are the response's (case-insensitive), for the limiter;
    ``body`` the JSON body as the server sent it, when the client keeps bodies."""

    completion: Completion
    http_status: int
    headers: Mapping[str, str]
    latency_s: float
    body: bytes | None = None


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
        keep_body: bool = False,
    ) -> None:
        if endpoint not in _PATHS:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected 'chat', 'completions' or 'embeddings'")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._endpoint = endpoint
        self._stream = stream
        self._api_key = api_key or None
        self._total = timeouts.total
        self._clock = clock
        self._max_body = max_body_bytes
        self._keep_body = keep_body
        self._urls = {name: httpx.URL(base_url.rstrip("/") + path) for name, path in _PATHS.items()}
        self._url = self._urls[endpoint]
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

    async def complete(self, body: dict[str, Any], endpoint: str | None = None, n: int = 1) -> Reply:
        """Send one request body (to ``endpoint``, else the client's); return the parsed answer
        or raise a ``RequestError``. An embeddings answer's vectors are in ``completion.vectors``.

        ``n`` > 1: the body asks for ``n`` choices, and the answer keeps them all."""
        endpoint = endpoint or self._endpoint
        if self._stream and endpoint != "embeddings":
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
                    return await self._send(content, started, endpoint, n)
            with anyio.fail_after(self._total):
                return await self._send(content, started, endpoint, n)
        except TimeoutError:
            raise self._redact(
                APIConnectionError(f"no complete answer within {self._total:g}s (total timeout)")
            ) from None
        except httpx.TimeoutException as exc:
            message = self._timeout_messages.get(type(exc)) or f"timed out: {exc}"
            raise self._redact(APIConnectionError(message)) from exc
        except CertificateError as exc:
            raise self._redact(APIConnectionError(
                f"the TLS certificate of {self._url.host} did not verify ({clip(str(exc), 160)}); "
                "if the server uses a private CA, point SSL_CERT_FILE at its certificate",
                code=CERTIFICATE_ERROR,
            )) from exc
        except httpx.TransportError as exc:
            raise self._redact(APIConnectionError(_transport_message(exc))) from exc
        except OSError as exc:
            # A third-party transport that lets a socket error through unwrapped.
            raise self._redact(APIConnectionError(clip(f"{type(exc).__name__}: {exc}"))) from exc
        except httpx.DecodingError as exc:
            raise self._redact(ResponseError(f"response body could not be decoded: {exc}")) from exc
        except RequestError as exc:
            raise self._redact(exc) from None

    async def _send(self, content: bytes, started: float, endpoint: str, n: int = 1) -> Reply:
        # What httpx.AsyncClient.stream() does, minus its per-request work (header merging,
        # auth and redirect flows, cookies): straight to the transport, which never redirects.
        url = self._urls[endpoint]
        request = httpx.Request(
            "POST",
            url,
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
                _log.debug("POST %s: HTTP %d after %.3f s", url, status, self._clock() - started)
            if not 200 <= status < 300:
                raise await self._status_error(response)
            raw: bytes | None = None
            if self._stream and endpoint != "embeddings" and "json" not in response.headers.get("content-type", ""):
                completion = await self._read_stream(response, started, endpoint, n)
            else:
                # A non-stream request, or a server that ignored "stream": a JSON body.
                raw = await self._read_body(response)
                completion = parse_embeddings(raw) if endpoint == "embeddings" else parse_completion(raw, endpoint, n)
        finally:
            await response.aclose()
        return Reply(completion, status, response.headers, self._clock() - started, raw if self._keep_body else None)

    async def _read_body(self, response: httpx.Response) -> bytes:
        chunks = [chunk async for chunk in _decoded_chunks(response, self._max_body, "response body")]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _read_stream(self, response: httpx.Response, started: float, endpoint: str, n: int = 1) -> Completion:
        assembler = StreamAssembler(endpoint, clock=self._clock, started=started, n=n)
        source = EventSource(cast(httpx.Response, _CappedResponse(response, self._max_body)))
        try:
            async for event in source.aiter_sse():
                if event.event == "error":
                    raise ResponseError(f"stream error event: {clip(event.data)}")
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
        code, message = error_text(b"".join(chunks)[:_ERROR_BODY_BYTES])
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
                f"HTTP {status}: redirect to {clip(location, 120) or '(no location)'} not followed; "
                "check api.base_url (its scheme, host and version prefix)",
                http_status=status, headers=response.headers,
            )
        text = f"HTTP {status}"
        shown = code if code != str(status) else None  # a gateway's code can be the status (LiteLLM's "429")
        if shown:
            text += f" ({clip(shown, 60)})"
        if message:
            text += f": {clip(message)}"
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
        return clip(f"could not connect: {detail}")
    if isinstance(exc, httpx.RemoteProtocolError):
        if detail.startswith("malformed response"):
            return clip(detail)
        return clip(f"connection closed by the server: {detail}")
    return clip(f"{type(exc).__name__}: {detail}")

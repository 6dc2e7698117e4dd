"""The client's transports: ``FastTransport`` (the default) and ``AiohttpTransport`` (behind a proxy).

``FastTransport`` speaks HTTP/1.1 with keep-alive itself, on asyncio protocols with
httptools parsing the answers; ``Client`` hands it request bytes and reads status,
headers and body straight off the connection, with no httpx objects for a 2xx JSON
answer. It is an ``httpx.AsyncBaseTransport`` too, for everything else. Proxies are
left to the transports below.

An httpx transport over aiohttp: httpx's interface, aiohttp's speed.

httpx's own connection pool does work proportional to its open connections on
every request, which caps a client at a few hundred requests per second once
hundreds of connections are open. aiohttp's connector does not. ``AiohttpTransport``
implements ``httpx.AsyncBaseTransport`` directly over one ``aiohttp.ClientSession``,
so ``httpx.Request`` goes in and ``httpx.Response`` comes out, with:

- a connector sized to the job's concurrency (``limit``), keep-alive, no cookie jar;
- response bodies streamed (``aiter_bytes`` / SSE work) and left encoded, so httpx
  decodes ``Content-Encoding`` exactly as it does with its own transport;
- httpx's per-request timeouts honoured: ``connect`` bounds connecting, ``read``
  the silence between bytes (aiohttp has no write timeout; request bodies are small
  and written in one go);
- aiohttp's exceptions mapped to httpx's (``ConnectError``, ``ConnectTimeout``,
  ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``, ...), so code that
  catches ``httpx.TransportError`` keeps working.

The session is created on first use, inside the running event loop, and closed
by ``aclose`` (``httpx.AsyncClient.aclose`` calls it).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import httptools
import httpx

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = ["AiohttpTransport", "FastTransport", "default_transport", "headers_mapping", "response_of"]

_REASONS: Final[dict[str, bytes]] = {}
_HTTP11: Final = b"HTTP/1.1"


def _map_exception(exc: Exception) -> Exception:
    """The httpx exception for an aiohttp (or socket) exception; ``exc`` itself if none fits."""
    import aiohttp

    message = str(exc) or type(exc).__name__
    mapped: type[httpx.TransportError]
    # Order matters: the most specific aiohttp classes first.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):  # SocketTimeoutError and its base
        mapped = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        mapped = httpx.ProxyError
    elif isinstance(exc, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        mapped = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientPayloadError):
        mapped = httpx.ReadError
    elif isinstance(exc, aiohttp.ClientResponseError):  # a malformed status line or headers
        mapped = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.NonHttpUrlClientError):
        mapped = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.InvalidURL):
        mapped = httpx.LocalProtocolError
    elif isinstance(exc, aiohttp.ClientConnectionError | OSError):
        mapped = httpx.ReadError
    elif isinstance(exc, TimeoutError):
        mapped = httpx.ReadTimeout
    else:
        return exc
    return mapped(message)


def _str_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    # aiohttp takes str headers and writes them as UTF-8, so UTF-8 round-trips the bytes;
    # httpx.Headers.multi_items() would re-guess the encoding for every header.
    try:
        return [(key.decode(), value.decode()) for key, value in raw]
    except UnicodeDecodeError:
        return [(key.decode("latin-1"), value.decode("latin-1")) for key, value in raw]


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one aiohttp response, chunk by chunk as it arrives."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import aiohttp

        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _map_exception(exc) from exc

    async def aclose(self) -> None:
        # Back to the pool if the body was read to its end, else the connection is closed.
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncBaseTransport`` over one ``aiohttp.ClientSession``.

    ``limit`` caps the open connections (size it to the concurrency); ``proxy`` is
    an ``http://`` proxy URL for every request, or None. ``verify`` is an SSL
    context, or a bool as in httpx (certifi's CA bundle when True).
    """

    def __init__(
        self,
        *,
        limit: int = 100,
        verify: ssl.SSLContext | bool = True,
        proxy: str | None = None,
        keepalive_s: float = 30.0,
    ) -> None:
        # Imported here: only a job behind an http:// proxy needs aiohttp (half a second to import).
        from yarl import URL

        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._verify = verify
        self._proxy = URL(proxy) if proxy else None
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[tuple[Any, Any, Any], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._closed:
            raise RuntimeError("the transport is closed")
        verify = self._verify
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=0,
            # httpx's defaults: certifi's CA bundle, or no verification at all.
            ssl=verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify),
            keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # httpx decodes, as with its own transport
            timeout=aiohttp.ClientTimeout(total=None),
            raise_for_status=False,
            requote_redirect_url=False,
        )
        return self._session

    def _timeout(self, timeouts: Any) -> aiohttp.ClientTimeout:
        import aiohttp

        # httpx puts {"connect", "read", "write", "pool"} on every request; a few distinct values a job.
        if not timeouts:
            key: tuple[Any, Any, Any] = (None, None, None)
        else:
            key = (timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool = key
            # aiohttp's ``connect`` covers waiting for a pooled connection too; sock_connect is the TCP/TLS part.
            timeout = aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)
            self._timeouts[key] = timeout
        return timeout

    def _url(self, url: httpx.URL) -> URL:
        text = str(url)
        parsed = self._urls.get(text)
        if parsed is None:
            from yarl import URL

            parsed = URL(text, encoded=True)
            if len(self._urls) < 256:  # a job posts to one URL; don't grow without bound
                self._urls[text] = parsed
        return parsed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp

        session = self._session or self._open()
        try:
            content = request.content
        except httpx.RequestNotRead:
            content = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        try:
            response = await session.request(
                request.method,
                self._url(request.url),
                headers=_str_headers(request.headers.raw),
                data=content or None,
                allow_redirects=False,
                timeout=self._timeout(request.extensions.get("timeout")),
                proxy=self._proxy,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _map_exception(exc) from exc
        reason = response.reason
        extensions: dict[str, Any] = {"http_version": _HTTP11}
        if reason:
            phrase = _REASONS.get(reason)
            if phrase is None:
                phrase = reason.encode("latin-1", "replace")
                if len(_REASONS) < 64:
                    _REASONS[reason] = phrase
            extensions["reason_phrase"] = phrase
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# -- FastTransport: HTTP/1.1 keep-alive on asyncio protocols and httptools ------------


class _Headers(dict[str, str]):
    """Response headers by lower-case name (repeated ones joined by ", "), looked up in any case."""

    __slots__ = ()

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


def headers_mapping(raw: list[tuple[bytes, bytes]]) -> _Headers:
    headers = _Headers()
    for key, value in _str_headers(raw):
        name = key.lower()
        headers[name] = f"{dict.__getitem__(headers, name)}, {value}" if name in headers else value
    return headers


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one request at a time: the response as httptools parses it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, release: Callable[[_Connection], None]) -> None:
        self._loop = loop
        self._release = release
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.key: tuple[str, str, int] = ("", "", 0)
        self._reset()

    def _reset(self) -> None:
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.reason = b""
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._done = False
        self._error: Exception | None = None
        self._received = False  # any byte of this response
        self._stale = False
        self._keep_alive = False
        self._read_s: float | None = None
        self._last = 0.0

    # asyncio.Protocol and httptools callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._read_s is None:  # bytes nobody asked for: this connection is not reusable
            self.close()
            return
        self._received = True
        self._last = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            return
        self._wake()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._size += len(body)

    def on_message_complete(self) -> None:
        self._done = True
        self._stop_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._read_s is None or self._done or self._error is not None:
            return  # idle, or this response is already settled
        if exc is None and self._headers_done and not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.raw_headers
        ):
            self._done = True  # a body delimited by the end of the connection
        elif self._received:
            self._error = httpx.ReadError(f"connection lost mid-response: {exc or 'closed by the server'}")
        else:
            self._error = httpx.RemoteProtocolError(f"server closed the connection without answering: {exc or 'EOF'}")
            self._stale = exc is None  # a clean close, not a reset: a keep-alive timeout met our request
        self._wake()

    # the request side
    def _fail(self, error: Exception) -> None:
        if self._error is None and not self._done:
            self._error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeout(self) -> None:
        # One timer a request, moved on lazily: data_received only notes the time.
        assert self._read_s is not None
        due = self._last + self._read_s
        if self._loop.time() >= due:
            self._timer = None
            self._fail(httpx.ReadTimeout(f"no data from the server for {self._read_s:g}s"))
        else:
            self._timer = self._loop.call_at(due, self._check_timeout)

    def send(self, data: bytes, read_s: float | None) -> None:
        self._reset()
        self._read_s = read_s if read_s is not None else float("inf")
        self._last = self._loop.time()
        if read_s is not None:
            self._timer = self._loop.call_at(self._last + read_s, self._check_timeout)
        assert self._transport is not None
        self._transport.write(data)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    async def wait_headers(self) -> None:
        while not self._headers_done:
            await self._wait()

    @property
    def stale(self) -> bool:
        """The server closed the connection (cleanly) before any byte of the answer."""
        return self._stale

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while not self._chunks:
            if self._done:
                return b""
            await self._wait()
        return self._chunks.pop(0)

    async def read_body(self, limit: int) -> bytes | None:
        """The whole body; None once it is over ``limit`` bytes (the rest is not read)."""
        while not self._done:
            if self._size > limit:
                return None
            await self._wait()
        if self._size > limit:
            return None
        chunks = self._chunks
        self._chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """Back to the pool if the answer was read to its end and may be followed by another."""
        if not (self._done and self._keep_alive and not self.closed and self._error is None):
            self.close()
        self._read_s = None
        self._stop_timer()
        self._release(self)

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()


class _Stream(httpx.AsyncByteStream):
    __slots__ = ("_conn", "_released")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self._conn.read_chunk():
            yield chunk

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._conn.release()


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive over asyncio protocols and httptools, for plain and TLS URLs.

    At most ``limit`` connections (all hosts together), one request on each at a time;
    idle ones are reused last-in first-out, callers beyond the limit wait in order. A
    request on a reused connection that the server had closed is sent again once, on a
    fresh one, if no byte of the answer came. Bodies stay encoded (httpx decodes them).
    ``post`` is the lean entry point ``Client`` uses; ``handle_async_request`` serves httpx.
    """

    def __init__(self, *, limit: int = 100, verify: ssl.SSLContext | bool = True) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._ssl: ssl.SSLContext | None = None
        self._verify = verify
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self._verify
            self._ssl = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify)
        return self._ssl

    def _release(self, conn: _Connection) -> None:
        if conn.closed:
            self._open -= 1
        elif self._closed:
            conn.close()
            self._open -= 1
        else:
            self._idle.setdefault(conn.key, []).append(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _acquire(self, key: tuple[str, str, int], connect_s: float | None) -> tuple[_Connection, bool]:
        while True:
            if self._closed:
                raise RuntimeError("the transport is closed")
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn, True
                self._open -= 1
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect(key, connect_s), False
                except BaseException:
                    self._open -= 1
                    self._release_slot()
                    raise
            if self._idle_elsewhere():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()  # pass the wake-up on
                raise

    def _idle_elsewhere(self) -> bool:
        # At the limit with idle connections to other hosts: close one to make room.
        for conns in self._idle.values():
            if conns:
                conns.pop(0).close()
                self._open -= 1
                return True
        return False

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, key: tuple[str, str, int], connect_s: float | None) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._release), host, port, ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {connect_s:g}s") from exc
        except OSError as exc:  # ssl.SSLError included: a certificate that does not verify
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        conn.key = key
        return conn

    async def post(
        self, key: tuple[str, str, int], data: bytes, connect_s: float | None, read_s: float | None
    ) -> _Connection:
        """Send ``data`` (a whole request) to ``key`` (scheme, host, port); the connection,
        its status and headers in, for ``read_body`` / ``read_chunk`` and then ``release``."""
        for attempt in (1, 2):
            conn, reused = await self._acquire(key, connect_s)
            try:
                conn.send(data, read_s)
                await conn.wait_headers()
            except httpx.TransportError:
                stale = reused and conn.stale and attempt == 1
                conn.release()
                if stale:
                    continue
                raise
            except BaseException:
                conn.release()
                raise
            return conn
        raise AssertionError("unreachable")  # pragma: no cover

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        if request.method == "HEAD":  # the parser would wait for the body a HEAD answer announces
            raise httpx.LocalProtocolError("HEAD is not supported by this transport")
        try:
            content = request.content
        except httpx.RequestNotRead:
            content = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
        lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), url.raw_path)]
        for name, value in request.headers.raw:
            if name.lower() not in (b"content-length", b"transfer-encoding"):
                lines.append(b"%s: %s" % (name, value))
        if content or request.method not in ("GET", "HEAD"):
            lines.append(b"Content-Length: %d" % len(content))
        timeouts = request.extensions.get("timeout") or {}
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        conn = await self.post(
            key, b"\r\n".join(lines) + b"\r\n\r\n" + content, timeouts.get("connect"), timeouts.get("read")
        )
        return response_of(conn, request)

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
                self._open -= 1
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # to find the transport closed
        await asyncio.sleep(0)  # asyncio closes the sockets on the next turn of the loop


def response_of(conn: _Connection, request: httpx.Request | None = None) -> httpx.Response:
    """An ``httpx.Response`` streaming the body of ``conn``'s answer; closing it releases ``conn``."""
    extensions: dict[str, Any] = {"http_version": _HTTP11, "reason_phrase": conn.reason}
    return httpx.Response(
        conn.status, headers=conn.raw_headers, stream=_Stream(conn), request=request, extensions=extensions
    )


def _env_proxy(url: httpx.URL) -> str | None:
    """The proxy the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) names for ``url``."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def default_transport(url: httpx.URL, limit: int, *, trust_env: bool = True) -> httpx.AsyncBaseTransport:
    """The transport for a client that posts to ``url`` with up to ``limit`` connections.

    ``FastTransport`` for an http or https URL without a proxy. With a proxy from the
    environment: ``AiohttpTransport`` for an http:// proxy, httpx's own transport for
    one aiohttp cannot use (an https:// or socks proxy).
    With ``trust_env``, SSL_CERT_FILE / SSL_CERT_DIR and the proxy variables apply, as in httpx.
    """
    proxy = _env_proxy(url) if trust_env else None
    verify = httpx.create_ssl_context(trust_env=trust_env) if url.scheme == "https" else True
    if proxy is not None and not proxy.startswith("http://"):
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        return httpx.AsyncHTTPTransport(verify=verify, limits=limits, proxy=proxy, trust_env=trust_env)
    if proxy is None and url.scheme in ("http", "https"):
        return FastTransport(limit=limit, verify=verify)
    return AiohttpTransport(limit=limit, verify=verify, proxy=proxy)

"""An httpx transport over aiohttp: httpx's interface, aiohttp's speed.

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

import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport", "default_transport"]

_REASONS: Final[dict[str, bytes]] = {}
_HTTP11: Final = b"HTTP/1.1"


def _map_exception(exc: Exception) -> Exception:
    """The httpx exception for an aiohttp (or socket) exception; ``exc`` itself if none fits."""
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
            parsed = URL(text, encoded=True)
            if len(self._urls) < 256:  # a job posts to one URL; don't grow without bound
                self._urls[text] = parsed
        return parsed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
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


def _env_proxy(url: httpx.URL) -> str | None:
    """The proxy the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) names for ``url``."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def default_transport(url: httpx.URL, limit: int, *, trust_env: bool = True) -> httpx.AsyncBaseTransport:
    """The transport for a client that posts to ``url`` with up to ``limit`` connections.

    ``AiohttpTransport``, unless the environment names a proxy for ``url`` that aiohttp
    cannot use (an https:// or socks proxy): that gets httpx's own transport, as before.
    With ``trust_env``, SSL_CERT_FILE / SSL_CERT_DIR and the proxy variables apply, as in httpx.
    """
    proxy = _env_proxy(url) if trust_env else None
    verify = httpx.create_ssl_context(trust_env=trust_env) if url.scheme == "https" else True
    if proxy is not None and not proxy.startswith("http://"):
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        return httpx.AsyncHTTPTransport(verify=verify, limits=limits, proxy=proxy, trust_env=trust_env)
    return AiohttpTransport(limit=limit, verify=verify, proxy=proxy)

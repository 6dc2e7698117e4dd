"""The network under the client: httpx's API over aiohttp, joined by httpx-aiohttp.

One stack for every case (plain http, TLS, proxies). The client speaks httpx's
transport interface, so tests swap in ``httpx.MockTransport``; the bytes go
through one ``aiohttp.ClientSession``, whose limits do the defending:

- response headers: at most ``MAX_HEADERS`` lines of at most ``MAX_HEADER_LINE``
  bytes each (a server that sends header lines without end fails that request);
- bodies: aiohttp inflates ``Content-Encoding`` itself, a bounded step at a time,
  so the client counts decoded bytes against its body limit as they arrive and a
  small gzip body cannot balloon in memory before it is counted;
- informational answers (``100 Continue``, ``103 Early Hints``) are skipped;
- redirects are never followed: a 3xx is handed up as it is;
- idle keep-alive connections are closed after ``KEEPALIVE_S``;
- IPv4/IPv6 fallback (Happy Eyeballs) where a host has both;
- a POST is never re-sent by aiohttp on a stale connection (it retries only
  idempotent methods): every attempt the server sees is one the retry policy counted.

TLS is always verified, against ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set (as
httpx does), else certifi's bundle. Proxies come from the environment
(``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), except that a
loopback target is always reached directly: the key never goes in clear text to
a proxy for a local server. HTTPS through a proxy tunnels with CONNECT.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any, Final

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from batch.errors import UsageError
from batch.spec import is_loopback

__all__ = [
    "KEEPALIVE_S",
    "MAX_HEADERS",
    "MAX_HEADER_LINE",
    "CertificateError",
    "Transport",
    "proxy_for",
]

MAX_HEADERS: Final = 128  # header lines in one answer
MAX_HEADER_LINE: Final = 8190  # bytes in one header line (name and value)
KEEPALIVE_S: Final = 15.0  # an idle connection is closed after this long
_CHUNK: Final = 2**16  # aiohttp reads and inflates at most this much at a time

_DROPPED_WHEN_DECODED: Final = frozenset({b"content-encoding", b"content-length"})


class CertificateError(httpx.ConnectError):
    """The server's TLS certificate did not verify: every request to it would fail the same way."""


def proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment names for ``url``; None for a loopback host or one NO_PROXY lists."""
    if is_loopback(url.host):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    if not proxy.startswith(("http://", "https://")):
        raise UsageError(
            f"the proxy set in the environment for {url.scheme} URLs is not an http(s) proxy "
            f"({proxy.split('://', 1)[0]}://...); promptmill supports http and https proxies"
        )
    return proxy


def _map_exception(exc: BaseException) -> Exception:
    """httpx's exception for an aiohttp (or socket) one, so the client catches httpx's tree only."""
    message = str(exc) or type(exc).__name__
    mapped: type[httpx.TransportError]
    # The most specific aiohttp classes first.
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        mapped = CertificateError
    elif isinstance(exc, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        mapped = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        mapped = httpx.ProxyError
    elif isinstance(exc, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        mapped = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientPayloadError):
        mapped = httpx.ReadError
    elif isinstance(exc, aiohttp.ClientResponseError):  # a malformed status line, headers over the limits
        mapped = httpx.RemoteProtocolError
        message = "malformed response: " + " ".join(str(exc.message).split())
    elif isinstance(exc, aiohttp.InvalidURL):
        mapped = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientConnectionError | OSError):
        mapped = httpx.ReadError
    elif isinstance(exc, TimeoutError):
        mapped = httpx.ReadTimeout
    else:
        return exc if isinstance(exc, Exception) else RuntimeError(message)
    return mapped(message)


class _Body(httpx.AsyncByteStream):
    """One answer's body, decoded, as aiohttp hands it over."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _map_exception(exc) from exc

    async def aclose(self) -> None:
        # A body read to its end gives the connection back to the pool; any other is closed.
        self._response.release()


class Transport(AiohttpTransport):
    """httpx-aiohttp's transport with aiohttp's limits set and aiohttp inflating bodies.

    ``limit`` caps the open connections (the job's concurrency); ``proxy`` is the
    proxy URL for every request (see :func:`proxy_for`), or None.
    """

    def __init__(
        self,
        *,
        limit: int,
        proxy: str | None = None,
        verify: ssl.SSLContext | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        # verify=True with trust_env: SSL_CERT_FILE / SSL_CERT_DIR when set, else certifi's bundle.
        super().__init__(verify=verify if verify is not None else True, trust_env=True)
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._proxy_url = proxy
        self._timeouts: dict[tuple[Any, Any, Any], aiohttp.ClientTimeout] = {}
        self._closed = False

    def get_client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the transport is closed")
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=0,
            ssl=self.ssl_context,
            keepalive_timeout=self._keepalive_s,
            ttl_dns_cache=300,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # an API batch has no use for cookies
            auto_decompress=True,
            read_bufsize=_CHUNK,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
            max_headers=MAX_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),  # the client bounds the whole request
            trust_env=False,  # proxies are chosen by proxy_for, loopback never proxied
            raise_for_status=False,
            requote_redirect_url=False,
        )

    def _timeout(self, timeouts: Any) -> aiohttp.ClientTimeout:
        # httpx puts {"connect", "read", "write", "pool"} on each request: a few distinct values a job.
        key = (None, None, None) if not timeouts else (timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool = key
            # aiohttp's ``connect`` includes waiting for a pooled connection; sock_connect is TCP and TLS.
            timeout = aiohttp.ClientTimeout(total=None, connect=pool, sock_connect=connect, sock_read=read)
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self.client = self.get_client()
        try:
            content = request.content
        except httpx.RequestNotRead:
            content = await request.aread()
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers,
                data=content or None,
                allow_redirects=False,
                timeout=self._timeout(request.extensions.get("timeout")),
                proxy=self._proxy_url,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _map_exception(exc) from exc
        headers = response.raw_headers
        if response.headers.get("content-encoding"):
            # aiohttp decoded the body; httpx must not decode it again.
            headers = tuple(pair for pair in headers if pair[0].lower() not in _DROPPED_WHEN_DECODED)
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx.Response(
            response.status, headers=headers, stream=_Body(response), request=request, extensions=extensions
        )

    async def aclose(self) -> None:
        self._closed = True
        await super().aclose()

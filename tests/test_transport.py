"""Both transports against the simulator on loopback, and FastTransport against raw sockets:
answers, streams, keep-alive, failures."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from batch.client import Client, Timeouts
from batch.errors import APIConnectionError
from batch.simulator import SimConfig, SimServer
from batch.transport import AiohttpTransport, FastTransport, default_transport

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig()) as server:
        yield server


@pytest.fixture
def faulty() -> Iterator[SimServer]:
    with SimServer(SimConfig(hang_s=5)) as server:
        yield server


@pytest.fixture(params=[AiohttpTransport, FastTransport])
def transport_type(request: pytest.FixtureRequest) -> type[httpx.AsyncBaseTransport]:
    kind: type[httpx.AsyncBaseTransport] = request.param
    return kind


def make_client(
    base_url: str, kind: Any = FastTransport, *, stream: bool = False, timeouts: Timeouts | None = None
) -> Client:
    return Client(
        base_url, endpoint="chat", stream=stream, api_key="sk-test", concurrency=4,
        timeouts=timeouts or Timeouts(), transport=kind(limit=4),
    )


async def test_json_answer(sim: SimServer, transport_type: Any) -> None:
    async with make_client(sim.base_url, transport_type) as client:
        replies = [await client.complete(BODY) for _ in range(3)]  # the connection is reused
    reply = replies[0]
    assert reply.http_status == 200
    assert reply.completion.finish_reason in ("stop", "length")
    assert reply.completion.text
    assert reply.completion.usage is not None and reply.completion.usage.prompt_tokens > 0
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.completion.ttft_s is None
    assert {r.completion.text for r in replies} == {reply.completion.text}  # deterministic


async def test_stream_assembles_the_same_answer(sim: SimServer, transport_type: Any) -> None:
    async with make_client(sim.base_url, transport_type) as client:
        plain = await client.complete(BODY)
    async with make_client(sim.base_url, transport_type, stream=True) as client:
        streamed = await client.complete(BODY)
    assert streamed.completion.text == plain.completion.text
    assert streamed.completion.usage == plain.completion.usage
    assert streamed.completion.ttft_s is not None
    assert streamed.headers["content-type"].startswith("text/event-stream")


async def test_plain_httpx_client_over_the_transport(sim: SimServer, transport_type: Any) -> None:
    async with httpx.AsyncClient(transport=transport_type(limit=2)) as client:
        response = await client.get(f"{sim.base_url}/models")
        assert response.status_code == 200
        assert response.reason_phrase == "OK"
        assert response.http_version == "HTTP/1.1"
        assert "data" in response.json()
        async with client.stream("POST", f"{sim.base_url}/chat/completions", json={**BODY, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"


async def test_connection_refused_is_a_connection_error(transport_type: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nothing listens
    async with make_client(f"http://127.0.0.1:{port}/v1", transport_type) as client:
        with pytest.raises(APIConnectionError, match="could not connect"):
            await client.complete(BODY)


async def test_read_timeout_is_a_connection_error(faulty: SimServer, transport_type: Any) -> None:
    faulty.configure(fault_rate=1.0, faults=["hang"])
    async with make_client(faulty.base_url, transport_type, timeouts=Timeouts(read=0.2)) as client:
        with pytest.raises(APIConnectionError, match="read timeout"):
            await client.complete(BODY)


async def test_total_timeout_is_a_connection_error(faulty: SimServer, transport_type: Any) -> None:
    faulty.configure(fault_rate=1.0, faults=["hang"])
    async with make_client(faulty.base_url, transport_type, timeouts=Timeouts(total=0.2)) as client:
        with pytest.raises(APIConnectionError, match="total timeout"):
            await client.complete(BODY)


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_is_a_connection_error(faulty: SimServer, stream: bool, transport_type: Any) -> None:
    faulty.configure(fault_rate=1.0, faults=["reset"])
    async with make_client(faulty.base_url, transport_type, stream=stream) as client:
        with pytest.raises(APIConnectionError):
            await client.complete(BODY)
        faulty.configure(fault_rate=0.0)
        assert (await client.complete(BODY)).http_status == 200  # the pool recovers


async def test_body_cut_midway_is_a_connection_error(transport_type: Any) -> None:
    # A Content-Length promising more than arrives: a ReadError.
    def cut_short(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"choices\": [")

    server = RawServer(cut_short)
    try:
        async with make_client(server.base_url, transport_type) as client:
            with pytest.raises(APIConnectionError):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)


def test_default_transport_is_fast_unless_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    url = httpx.URL("https://api.example.com/v1/chat/completions")
    assert isinstance(default_transport(url, 8), FastTransport)
    assert isinstance(default_transport(httpx.URL("http://127.0.0.1:8000/v1"), 8), FastTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    transport = default_transport(url, 8)
    assert isinstance(transport, AiohttpTransport)
    assert str(transport._proxy) == "http://proxy.local:3128"
    assert isinstance(default_transport(url, 8, trust_env=False), FastTransport)
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert isinstance(default_transport(url, 8), FastTransport)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.local:3129")  # aiohttp has no TLS-to-proxy
    assert isinstance(default_transport(url, 8), httpx.AsyncHTTPTransport)


def test_client_without_a_transport_uses_the_default() -> None:
    client = Client("http://127.0.0.1:1/v1", endpoint="chat", stream=False, api_key=None, concurrency=3)
    assert isinstance(client._transport, FastTransport)
    assert client._transport._limit == 3


async def test_closed_transport_refuses_requests(sim: SimServer, transport_type: Any) -> None:
    transport = transport_type(limit=1)
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", f"{sim.base_url}/models"))


# -- FastTransport against a raw socket server --------------------------------

ANSWER = (b'{"id": "x", "created": 1700000000, "choices": [{"message": {"content": "hi"}, '
          b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}')


def json_response(body: bytes = ANSWER, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-type: application/json", b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def read_request(conn: socket.socket) -> bytes | None:
    """One request off ``conn`` (head and Content-Length body); None at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head


class RawServer:
    """Accepts connections on 127.0.0.1 and hands the n-th one to ``handlers[n]``, in a thread."""

    def __init__(self, *handlers: Callable[[socket.socket], None]) -> None:
        self.accepted = 0
        self._handlers = handlers
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(10)
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for handler in self._handlers:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                handler(conn)

    def close(self) -> None:
        self._sock.close()
        self._thread.join(10)


def answer_all(*extra: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        while read_request(conn) is not None:
            conn.sendall(json_response(ANSWER, *extra))
    return handler


async def test_fast_keeps_one_connection_alive() -> None:
    server = RawServer(answer_all())
    try:
        async with make_client(server.base_url) as client:
            replies = [await client.complete(BODY) for _ in range(3)]
    finally:
        await asyncio.to_thread(server.close)
    assert [r.completion.text for r in replies] == ["hi"] * 3
    assert replies[0].headers["Content-Type"] == "application/json"  # any case
    assert server.accepted == 1


async def test_fast_connection_close_is_not_reused() -> None:
    def once(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(json_response(ANSWER, b"connection: close"))

    server = RawServer(once, once)
    try:
        async with make_client(server.base_url) as client:
            assert (await client.complete(BODY)).completion.text == "hi"
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)
    assert server.accepted == 2


@pytest.mark.parametrize("wait", [True, False])
async def test_fast_server_closing_an_idle_connection(wait: bool) -> None:
    # Closed while idle (seen before the next request), or closed on receiving it without a
    # byte of answer (a keep-alive timeout meeting our request): the request goes out again.
    def one_then_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(json_response())
        if not wait:
            read_request(conn)

    server = RawServer(one_then_close, answer_all())
    try:
        async with make_client(server.base_url) as client:
            assert (await client.complete(BODY)).completion.text == "hi"
            if wait:
                await asyncio.sleep(0.2)
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)
    assert server.accepted == 2


async def test_fast_chunked_and_close_delimited_bodies() -> None:
    def chunked(conn: socket.socket) -> None:
        read_request(conn)
        half = len(ANSWER) // 2
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n" % (half, ANSWER[:half]))
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ANSWER) - half, ANSWER[half:]))
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + ANSWER)

    server = RawServer(chunked)
    try:
        async with make_client(server.base_url) as client:
            first = await client.complete(BODY)
            second = await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)
    assert first.completion.text == second.completion.text == "hi"
    assert first.completion.usage is not None and first.completion.usage.total_tokens == 4


async def test_fast_gzip_answer_is_decoded() -> None:
    import gzip

    packed = gzip.compress(ANSWER)

    def gzipped(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(json_response(packed, b"content-encoding: gzip"))

    server = RawServer(gzipped)
    try:
        async with make_client(server.base_url) as client:
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)


async def test_fast_malformed_status_line_is_a_connection_error() -> None:
    def garbage(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 abc nonsense\r\n\r\n")

    server = RawServer(garbage)
    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(APIConnectionError, match="malformed response"):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)


async def test_fast_pool_holds_the_limit(sim: SimServer) -> None:
    sim.configure(latency_ms=50)
    transport = FastTransport(limit=2)
    client = Client(sim.base_url, endpoint="chat", stream=False, api_key=None, concurrency=2, transport=transport)
    peak = 0

    async def one() -> None:
        nonlocal peak
        await client.complete(BODY)
        peak = max(peak, transport._open)

    try:
        async with client:
            await asyncio.gather(*(one() for _ in range(8)))
    finally:
        sim.configure(latency_ms=0)
    assert peak <= 2
    assert transport._open == 0  # aclose closed the idle ones

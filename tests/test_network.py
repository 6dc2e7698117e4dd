"""The network stack (httpx-aiohttp) against the simulator and against raw-socket servers on
loopback that misbehave: answers, streams, keep-alive, failures, and the limits that hold."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trustme

from batch.client import Client, Timeouts
from batch.errors import APIConnectionError, APIStatusError, ResponseError, UsageError
from batch.network import Transport
from batch.retry import classify
from batch.simulator import SimConfig, SimServer
from tests.helpers import CliRun, prompts, run_cli, write_jsonl

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig()) as server:
        yield server


@pytest.fixture
def faulty() -> Iterator[SimServer]:
    with SimServer(SimConfig(hang_s=5)) as server:
        yield server


def make_client(
    base_url: str, *, stream: bool = False, timeouts: Timeouts | None = None, max_body_bytes: int = 32 * 2**20
) -> Client:
    return Client(
        base_url, endpoint="chat", stream=stream, api_key="sk-test", concurrency=4,
        timeouts=timeouts or Timeouts(), transport=Transport(limit=4), max_body_bytes=max_body_bytes,
    )


async def test_json_answer(sim: SimServer) -> None:
    async with make_client(sim.base_url) as client:
        replies = [await client.complete(BODY) for _ in range(3)]  # the connection is reused
    reply = replies[0]
    assert reply.http_status == 200
    assert reply.completion.finish_reason in ("stop", "length")
    assert reply.completion.text
    assert reply.completion.usage is not None and reply.completion.usage.prompt_tokens > 0
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.completion.ttft_s is None
    assert {r.completion.text for r in replies} == {reply.completion.text}  # deterministic


async def test_stream_assembles_the_same_answer(sim: SimServer) -> None:
    async with make_client(sim.base_url) as client:
        plain = await client.complete(BODY)
    async with make_client(sim.base_url, stream=True) as client:
        streamed = await client.complete(BODY)
    assert streamed.completion.text == plain.completion.text
    assert streamed.completion.usage == plain.completion.usage
    assert streamed.completion.ttft_s is not None
    assert streamed.headers["content-type"].startswith("text/event-stream")


async def test_plain_httpx_client_over_the_transport(sim: SimServer) -> None:
    async with httpx.AsyncClient(transport=Transport(limit=2)) as client:
        response = await client.get(f"{sim.base_url}/models")
        assert response.status_code == 200
        assert response.reason_phrase == "OK"
        assert response.http_version == "HTTP/1.1"
        assert "data" in response.json()
        async with client.stream("POST", f"{sim.base_url}/chat/completions", json={**BODY, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"


async def test_connection_refused_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nothing listens
    async with make_client(f"http://127.0.0.1:{port}/v1") as client:
        with pytest.raises(APIConnectionError, match="could not connect"):
            await client.complete(BODY)


async def test_read_timeout_is_a_connection_error(faulty: SimServer) -> None:
    faulty.configure(fault_rate=1.0, faults=["hang"])
    async with make_client(faulty.base_url, timeouts=Timeouts(read=0.2)) as client:
        with pytest.raises(APIConnectionError, match="read timeout"):
            await client.complete(BODY)


async def test_total_timeout_is_a_connection_error(faulty: SimServer) -> None:
    faulty.configure(fault_rate=1.0, faults=["hang"])
    async with make_client(faulty.base_url, timeouts=Timeouts(total=0.2)) as client:
        with pytest.raises(APIConnectionError, match="total timeout"):
            await client.complete(BODY)


@pytest.mark.parametrize("stream", [False, True])
async def test_reset_is_a_connection_error(faulty: SimServer, stream: bool) -> None:
    faulty.configure(fault_rate=1.0, faults=["reset"])
    async with make_client(faulty.base_url, stream=stream) as client:
        with pytest.raises(APIConnectionError):
            await client.complete(BODY)
        faulty.configure(fault_rate=0.0)
        assert (await client.complete(BODY)).http_status == 200  # the pool recovers


async def test_body_cut_midway_is_a_connection_error() -> None:
    # A Content-Length promising more than arrives: a ReadError.
    def cut_short(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"choices\": [")

    server = RawServer(cut_short)
    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(APIConnectionError):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)


def test_client_without_a_transport_uses_the_default() -> None:
    client = Client("http://127.0.0.1:1/v1", endpoint="chat", stream=False, api_key=None, concurrency=3)
    assert isinstance(client._transport, Transport)
    assert client._transport._limit == 3


async def test_closed_transport_refuses_requests(sim: SimServer) -> None:
    transport = Transport(limit=1)
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", f"{sim.base_url}/models"))


# -- against raw socket servers --------------------------------------------------

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
    """Accepts connections on 127.0.0.1 and hands the n-th one to ``handlers[n]``, each in a thread."""

    def __init__(self, *handlers: Callable[[socket.socket], None]) -> None:
        self.accepted = 0
        self._handlers = handlers
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(10)
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # Each connection in a thread of its own, so a kept-alive one holds up no other.
        threads = []
        for handler in self._handlers:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                break
            self.accepted += 1
            thread = threading.Thread(target=self._handle, args=(handler, conn), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(10)

    @staticmethod
    def _handle(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
        with conn:
            handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting in accept()
        self._sock.close()
        self._thread.join(10)


def answer_all(*extra: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        while read_request(conn) is not None:
            conn.sendall(json_response(ANSWER, *extra))
    return handler


async def test_keeps_one_connection_alive() -> None:
    server = RawServer(answer_all())
    try:
        async with make_client(server.base_url) as client:
            replies = [await client.complete(BODY) for _ in range(3)]
    finally:
        await asyncio.to_thread(server.close)
    assert [r.completion.text for r in replies] == ["hi"] * 3
    assert replies[0].headers["Content-Type"] == "application/json"  # any case
    assert server.accepted == 1


async def test_connection_close_is_not_reused() -> None:
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


async def test_server_closing_an_idle_connection_is_seen_before_reuse() -> None:
    def one_then_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(json_response())

    server = RawServer(one_then_close, answer_all())
    try:
        async with make_client(server.base_url) as client:
            assert (await client.complete(BODY)).completion.text == "hi"
            await asyncio.sleep(0.2)  # the close reaches the pool while the connection is idle
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)
    assert server.accepted == 2


async def test_a_stale_connection_never_resends_a_post() -> None:
    # Closed on receiving the second request without a byte of answer (a keep-alive timeout
    # meeting our request): the POST may have been processed and paid, so nothing below the
    # retry policy sends it again. The caller sees one failed attempt; the server saw two requests.
    seen: list[bytes] = []

    def answer_then_drop(conn: socket.socket) -> None:
        seen.append(read_request(conn) or b"")
        conn.sendall(json_response())
        request = read_request(conn)
        if request is not None:
            seen.append(request)

    server = RawServer(answer_then_drop, answer_all())
    try:
        async with make_client(server.base_url) as client:
            assert (await client.complete(BODY)).completion.text == "hi"
            with pytest.raises(APIConnectionError, match="closed by the server"):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)
    assert len(seen) == 2
    assert server.accepted == 1  # no second connection was opened to send it again


async def test_chunked_and_close_delimited_bodies() -> None:
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


async def test_gzip_answer_is_decoded() -> None:
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


async def test_malformed_status_line_is_a_connection_error() -> None:
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


async def test_pool_holds_the_limit() -> None:
    with SimServer(SimConfig(latency_ms=50)) as sim:
        client = Client(sim.base_url, endpoint="chat", stream=False, api_key=None, concurrency=2,
                        transport=Transport(limit=2))
        async with client:
            await asyncio.gather(*(client.complete(BODY) for _ in range(8)))
    assert sim.stats["requests"] == 8
    assert sim.stats["max_in_flight"] == 2


# -- hostile servers --------------------------------------------------------------


async def test_informational_answers_in_their_own_packets_are_skipped() -> None:
    # 100 Continue and 103 Early Hints, each sent on its own, before the real answer; twice on
    # one connection, so state left over from the first answer would break the second.
    def hints_first(conn: socket.socket) -> None:
        for _ in range(2):
            read_request(conn)
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.02)
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            time.sleep(0.02)
            conn.sendall(json_response())

    server = RawServer(hints_first)
    try:
        async with make_client(server.base_url) as client:
            replies = [await client.complete(BODY) for _ in range(2)]
    finally:
        await asyncio.to_thread(server.close)
    assert [(r.http_status, r.completion.text) for r in replies] == [(200, "hi"), (200, "hi")]
    assert server.accepted == 1


def _send_until_refused(conn: socket.socket, head: bytes, piece: bytes, most: int) -> int:
    """Send ``head`` then ``piece`` up to ``most`` times, until the client hangs up; how many went."""
    conn.sendall(head)
    sent = 0
    try:
        while sent < most:
            conn.sendall(piece)
            sent += 1
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("shape", ["many lines", "one long line"])
async def test_headers_without_end_fail_the_request_within_the_limits(shape: str) -> None:
    sent: list[int] = []

    def endless(conn: socket.socket) -> None:
        read_request(conn)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        if shape == "many lines":  # 200,000 header lines (~4 MB) unless the client stops reading
            sent.append(_send_until_refused(conn, head, b"x-filler: 0123456789\r\n", 200_000))
        else:  # one header line growing to ~50 MB
            sent.append(_send_until_refused(conn, head + b"x-filler: ", b"a" * 1024, 50_000))

    server = RawServer(endless)
    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(APIConnectionError, match="malformed response") as caught:
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)
    message = caught.value.message.lower()
    assert "header" in message or "8190 bytes" in message
    assert sent and sent[0] < (200_000 if shape == "many lines" else 50_000)  # the client hung up early


def _gzip_bomb(prefix: bytes, size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    block = b"\0" * 2**20 if not prefix.startswith(b"data:") else b"a" * 2**20
    parts = [packer.compress(prefix)]
    parts += [packer.compress(block) for _ in range(size // len(block))]
    parts.append(packer.flush())
    return b"".join(parts)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_compressed_body_is_counted_as_it_is_inflated(stream: bool) -> None:
    # About 64 KB on the wire, 64 MiB inflated: the 1 MiB limit stops it after about 1 MiB.
    kind = b"text/event-stream" if stream else b"application/json"
    bomb = _gzip_bomb(b"data: " if stream else b'{"choices": [{"message": {"content": "', 64 * 2**20)
    assert len(bomb) < 2**17

    def bombing(conn: socket.socket) -> None:
        read_request(conn)
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
                % (kind, len(bomb)))
        with contextlib.suppress(OSError):
            conn.sendall(head + bomb)

    server = RawServer(bombing)
    try:
        async with make_client(server.base_url, stream=stream, max_body_bytes=2**20) as client:
            with pytest.raises(ResponseError, match=r"larger than 1048576 bytes \(after decompression\)"):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)


async def test_a_redirect_is_never_followed() -> None:
    elsewhere = RawServer(answer_all())
    host, port = "127.0.0.1", elsewhere.base_url.rsplit(":", 1)[1].split("/")[0]

    def redirect(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://%s:%s/v1/chat/completions\r\n"
                     b"content-length: 0\r\n\r\n" % (host.encode(), port.encode()))

    server = RawServer(redirect)
    try:
        async with make_client(server.base_url) as client:
            with pytest.raises(APIStatusError) as caught:
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(server.close)
        await asyncio.to_thread(elsewhere.close)
    assert caught.value.http_status == 307
    assert "not followed" in caught.value.message and f":{port}/v1" in caught.value.message
    assert classify(caught.value) == "fail"  # the row fails; not retried
    assert elsewhere.accepted == 0  # the key never reached the other origin


async def test_a_loopback_server_is_never_reached_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = RawServer(answer_all())
    server = RawServer(answer_all())
    proxy_url = proxy.base_url.removesuffix("/v1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy_url)
    try:
        client = Client(server.base_url, endpoint="chat", stream=False, api_key="sk-secret", concurrency=2)
        async with client:
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)
        await asyncio.to_thread(proxy.close)
    assert (server.accepted, proxy.accepted) == (1, 0)


async def test_https_through_a_proxy_tunnels_and_the_proxy_never_sees_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bytes] = []

    def refusing_proxy(conn: socket.socket) -> None:
        seen.append(read_request(conn) or b"")
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")

    proxy = RawServer(refusing_proxy)
    monkeypatch.setenv("HTTPS_PROXY", proxy.base_url.removesuffix("/v1"))
    try:
        client = Client("https://api.example.invalid/v1", endpoint="chat", stream=False,
                        api_key="sk-secret", concurrency=2)
        async with client:
            with pytest.raises(APIConnectionError):
                await client.complete(BODY)
    finally:
        await asyncio.to_thread(proxy.close)
    assert seen and seen[0].startswith(b"CONNECT api.example.invalid:443 ")
    assert b"sk-secret" not in seen[0]


def test_a_socks_proxy_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(UsageError, match="not an http\\(s\\) proxy"):
        Client("https://api.example.invalid/v1", endpoint="chat", stream=False, api_key="k", concurrency=1)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


def _tls_server(ca: trustme.CA, handlers: int) -> RawServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)

    def tls(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as wrapped:
                answer_all()(wrapped)
        except (ssl.SSLError, OSError):
            pass  # the client refused our certificate

    return RawServer(*[tls] * handlers)


async def test_tls_is_verified_and_ssl_cert_file_is_honoured(
    tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _tls_server(tls_ca, 2)
    url = server.base_url.replace("http://", "https://")
    try:
        refused = Client(url, endpoint="chat", stream=False, api_key="k", concurrency=1)
        async with refused:
            with pytest.raises(APIConnectionError, match=r"did not verify.*SSL_CERT_FILE") as caught:
                await refused.complete(BODY)
        assert classify(caught.value) == "fatal"  # every request would fail the same way: the job stops
        ca_file = tmp_path / "ca.pem"
        tls_ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        trusted = Client(url, endpoint="chat", stream=False, api_key="k", concurrency=1)
        async with trusted:
            assert (await trusted.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)


async def test_idle_connections_expire() -> None:
    server = RawServer(answer_all(), answer_all())
    client = Client(server.base_url, endpoint="chat", stream=False, api_key=None, concurrency=1,
                    transport=Transport(limit=1, keepalive_s=0.05))
    try:
        async with client:
            assert (await client.complete(BODY)).completion.text == "hi"
            await asyncio.sleep(0.5)  # well past the idle limit: the client closes the connection
            assert (await client.complete(BODY)).completion.text == "hi"
    finally:
        await asyncio.to_thread(server.close)
    assert server.accepted == 2


# -- the row outcomes, through the command ------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], tmp_path: Path, base_url: str, rows: int) -> tuple[CliRun, pa.Table]:
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(rows))
    out = tmp_path / "out.parquet"
    result = run_cli(capsys, "run", "--input", inp, "--output", out, "--base-url", base_url,
                     "--model", "m", "--no-progress", "--concurrency", "2")
    return result, (pq.read_table(out) if out.exists() else pa.table({}))


def test_rows_behind_informational_answers_are_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def hints_first(conn: socket.socket) -> None:
        while read_request(conn) is not None:
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n")
            time.sleep(0.005)
            conn.sendall(json_response())

    server = RawServer(hints_first, hints_first)
    try:
        result, table = _run(capsys, tmp_path, server.base_url, 6)
    finally:
        server.close()
    assert result.code == 0, result.err
    assert table.column("status").to_pylist() == ["ok"] * 6
    assert table.column("text").to_pylist() == ["hi"] * 6


def test_a_redirect_fails_its_rows_without_retrying(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    requests: list[bytes] = []

    def redirect(conn: socket.socket) -> None:
        while (request := read_request(conn)) is not None:
            requests.append(request)
            conn.sendall(b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://elsewhere.invalid/v1/chat/completions"
                         b"\r\ncontent-length: 0\r\n\r\n")

    server = RawServer(redirect, redirect)
    try:
        result, table = _run(capsys, tmp_path, server.base_url, 4)
    finally:
        server.close()
    assert result.code == 1
    assert table.column("status").to_pylist() == ["failed"] * 4
    assert table.column("http_status").to_pylist() == [301] * 4
    assert all("not followed" in e for e in table.column("error").to_pylist())
    assert len(requests) == 4  # one attempt a row


def test_an_unverified_certificate_stops_the_job(
    tls_ca: trustme.CA, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATOMA_API_KEY", "sk-secret")
    server = _tls_server(tls_ca, 16)  # room for every connection the job may open
    try:
        result, _ = _run(capsys, tmp_path, server.base_url.replace("http://", "https://"), 4)
    finally:
        server.close()
    assert result.code == 3
    assert "did not verify" in result.err and "SSL_CERT_FILE" in result.err
    assert "Traceback" not in result.err and "sk-secret" not in result.err


def test_the_job_file_sets_the_body_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = (b'{"choices": [{"message": {"content": "' + b"x" * 4000 + b'"}, "finish_reason": "stop"}], '
           b'"usage": {"prompt_tokens": 3, "completion_tokens": 900}}')

    def large(conn: socket.socket) -> None:
        while read_request(conn) is not None:
            conn.sendall(json_response(big))

    server = RawServer(large, large)
    job = tmp_path / "job.toml"
    job.write_text(f'[input]\npath = "{write_jsonl(tmp_path / "in.jsonl", prompts(2))}"\n'
                   f'[output]\npath = "{tmp_path / "out.parquet"}"\n'
                   f'[api]\nbase_url = "{server.base_url}"\nmax_response_mb = 0.002\n'
                   '[request]\nmodel = "m"\n[retry]\nmax_attempts = 1\n')
    try:
        result = run_cli(capsys, "run", job, "--no-progress")
    finally:
        server.close()
    table = pq.read_table(tmp_path / "out.parquet")
    assert result.code == 1
    assert table.column("status").to_pylist() == ["failed", "failed"]
    assert all("over the 2097-byte limit" in e for e in table.column("error").to_pylist())

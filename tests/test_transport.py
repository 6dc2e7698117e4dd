"""The aiohttp-backed transport against the simulator on loopback: answers, streams, failures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
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


def make_client(base_url: str, *, stream: bool = False, timeouts: Timeouts | None = None) -> Client:
    return Client(
        base_url, endpoint="chat", stream=stream, api_key="sk-test", concurrency=4,
        timeouts=timeouts or Timeouts(), transport=AiohttpTransport(limit=4),
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
    async with httpx.AsyncClient(transport=AiohttpTransport(limit=2)) as client:
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
    # A Content-Length promising more than arrives: aiohttp's payload error maps to httpx.ReadError.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        async with make_client(f"http://127.0.0.1:{port}/v1") as client:
            import anyio

            async def answer() -> None:
                conn, _ = await anyio.to_thread.run_sync(server.accept)
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: 100\r\n\r\n{\"choices\": [")

            async with anyio.create_task_group() as tg:
                tg.start_soon(answer)
                with pytest.raises(APIConnectionError):
                    await client.complete(BODY)


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


async def test_closed_transport_refuses_requests(sim: SimServer) -> None:
    transport = AiohttpTransport(limit=1)
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", f"{sim.base_url}/models"))

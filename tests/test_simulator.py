"""The simulator on loopback: shapes, usage, limits, faults, admin API."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import orjson
import pytest

from batch.simulator import (
    SimConfig,
    SimServer,
    count_prompt_tokens,
    key_label,
    reply_for,
)

CHAT: dict[str, Any] = {
    "model": "sim-model",
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Name three rivers of Europe"}],
    "max_tokens": 64,
}
COMPLETION: dict[str, Any] = {"model": "sim-model", "prompt": "Once upon a time there was", "max_tokens": 64}
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def server() -> Iterator[SimServer]:
    with SimServer() as sim:
        yield sim


@pytest.fixture
def sim(server: SimServer) -> SimServer:
    """The shared server, back at default settings with zeroed counters."""
    server.configure(**msgspec.structs.asdict(SimConfig()))
    server.reset_stats()
    return server


@pytest.fixture(scope="module")
def shared_client(server: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5) as c:  # one TLS context setup, not one per test
        yield c


@pytest.fixture
def client(sim: SimServer, shared_client: httpx.Client) -> httpx.Client:
    return shared_client


def sse_data(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]


def chunks(response: httpx.Response) -> list[dict[str, Any]]:
    return [orjson.loads(d) for d in sse_data(response) if d != "[DONE]"]


def expected_usage(body: dict[str, Any]) -> tuple[int, int]:
    return count_prompt_tokens(body), reply_for(body)[1]


# --- shapes and usage ------------------------------------------------------------------


def test_chat_non_stream_shape_and_exact_usage(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    text, completion_tokens, finish = reply_for(CHAT)
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    assert data["model"] == "sim-model"
    assert data["system_fingerprint"]
    assert data["response_hash"] and data["signature"]  # Atoma's extra fields
    assert data["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish}]
    assert finish == "stop"
    assert completion_tokens == len(text.split())
    assert count_prompt_tokens(CHAT) == 2 + 2 + 5  # words of each message + 1 per message
    assert data["usage"] == {
        "prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_completions_non_stream_shape(client: httpx.Client) -> None:
    data = client.post("/completions", json=COMPLETION).json()
    text, completion_tokens, finish = reply_for(COMPLETION)
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert data["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    assert data["usage"]["prompt_tokens"] == count_prompt_tokens(COMPLETION) == 6
    assert data["usage"]["completion_tokens"] == completion_tokens


def test_chat_stream_ends_with_done_and_usage_chunk(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json={**CHAT, **STREAM})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert sse_data(response)[-1] == "[DONE]"
    events = chunks(response)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == reply_for(CHAT)[0]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert events[-1]["choices"] == []
    assert (events[-1]["usage"]["prompt_tokens"], events[-1]["usage"]["completion_tokens"]) == expected_usage(CHAT)
    assert all(e["usage"] is None for e in events[:-1])


def test_completions_stream_atoma_style_ends_at_eof_after_usage(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(stream_done=False, keepalive=True)
    response = client.post("/completions", json={**COMPLETION, **STREAM})
    assert "[DONE]" not in response.text
    assert ": keep-alive" in response.text
    events = chunks(response)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == reply_for(COMPLETION)[0]
    assert events[-1]["choices"] == []
    assert (events[-1]["usage"]["prompt_tokens"], events[-1]["usage"]["completion_tokens"]) == expected_usage(COMPLETION)


def test_stream_usage_in_every_chunk(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(usage_every_chunk=True)
    events = chunks(client.post("/chat/completions", json={**CHAT, **STREAM}))
    assert all(e["usage"]["prompt_tokens"] == count_prompt_tokens(CHAT) for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == reply_for(CHAT)[1]


def test_stream_with_latency_still_assembles(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(latency_ms=40, ttft_ms=10)
    events = chunks(client.post("/chat/completions", json={**CHAT, **STREAM}))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == reply_for(CHAT)[0]


def test_small_max_tokens_gives_finish_reason_length(client: httpx.Client) -> None:
    body = {**CHAT, "max_tokens": 2}
    data = client.post("/chat/completions", json=body).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2
    assert len(data["choices"][0]["message"]["content"].split()) == 2
    assert reply_for(body) == (data["choices"][0]["message"]["content"], 2, "length")
    events = chunks(client.post("/chat/completions", json={**body, **STREAM}))
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"


def test_n_choices_count_every_choice(client: httpx.Client) -> None:
    body = {**COMPLETION, "n": 3}
    data = client.post("/completions", json=body).json()
    assert [c["text"] for c in data["choices"]] == [reply_for(body, i)[0] for i in range(3)]
    assert data["usage"]["completion_tokens"] == sum(reply_for(body, i)[1] for i in range(3))


def test_replies_are_deterministic(client: httpx.Client) -> None:
    first = client.post("/chat/completions", json=CHAT).json()
    second = client.post("/chat/completions", json=CHAT).json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert first["id"] != second["id"]
    others = {reply_for({**CHAT, "seed": seed})[0] for seed in range(5)}
    assert len(others) > 1  # the seed is part of what a reply depends on


def test_bad_requests_get_400_and_unknown_paths_404(client: httpx.Client) -> None:
    assert client.post("/chat/completions", content=b"{not json").status_code == 400
    assert client.post("/chat/completions", json={"model": "m"}).status_code == 400
    assert client.post("/completions", json={"prompt": "hi"}).status_code == 400
    response = client.post("/chat/completions", json={**CHAT, "max_tokens": 0})
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]
    assert client.post("/embeddings", json={}).status_code == 400
    assert client.post("/rerank", json={}).status_code == 404


# --- rate limits -----------------------------------------------------------------------


def test_rpm_limit_openai_style_answers_429_with_headers(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(rpm=3, tpm=100_000, window_s=2.0)
    ok = [client.post("/chat/completions", json=CHAT) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "3"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "2"
    assert ok[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert ok[0].headers["x-ratelimit-limit-tokens"] == "100000"
    limited = client.post("/chat/completions", json=CHAT)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] in {"1", "2"}
    assert 0 < int(limited.headers["retry-after-ms"]) <= 2000
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    stats = sim.stats
    assert stats["by_status"] == {"200": 3, "429": 1}
    assert stats["rate_limited"] == 1


def test_rate_limit_atoma_style_is_bare(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(rpm=1, window_s=2.0, limit_style="atoma")
    first = client.post("/completions", json=COMPLETION)
    assert first.status_code == 200
    assert not any(name.startswith("x-ratelimit") for name in first.headers)
    limited = client.post("/completions", json=COMPLETION)
    assert limited.status_code == 429
    assert limited.json() == {"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}}
    assert "retry-after" not in limited.headers
    assert not any(name.startswith("x-ratelimit") for name in limited.headers)


def test_tpm_counts_prompt_plus_max_tokens(sim: SimServer, client: httpx.Client) -> None:
    cost = count_prompt_tokens(CHAT) + CHAT["max_tokens"]
    sim.configure(tpm=cost * 2, window_s=2.0)
    statuses = [client.post("/chat/completions", json=CHAT).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


# --- faults ----------------------------------------------------------------------------


def expected_faults(seed: int, rate: float, faults: tuple[str, ...], requests: int) -> list[str | None]:
    """What the simulator's seeded RNG picks for the first ``requests`` admitted requests."""
    rng = random.Random(seed)
    return [faults[rng.randrange(len(faults))] if rng.random() < rate else None for _ in range(requests)]


@pytest.mark.parametrize("kind", ["500", "502", "503", "malformed", "cut"])
@pytest.mark.parametrize("stream", [False, True])
def test_fault_kinds_at_the_seeded_rate(sim: SimServer, client: httpx.Client, kind: str, stream: bool) -> None:
    sim.configure(fault_rate=0.3, faults=[kind], seed=7)
    plan = expected_faults(7, 0.3, (kind,), 60)
    body = {**CHAT, **STREAM} if stream else CHAT
    broken = 0
    for planned in plan:
        response = client.post("/chat/completions", json=body)
        if planned is None:
            assert response.status_code == 200
            continue
        broken += 1
        if kind in {"500", "503"}:
            assert response.status_code == int(kind)
            assert response.json()["error"]["code"]
        elif kind == "502":
            assert response.status_code == 502
            assert response.headers["content-type"] == "text/html"
        elif not stream:
            assert response.status_code == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(response.content)
        elif kind == "malformed":
            with pytest.raises(orjson.JSONDecodeError):
                chunks(response)
        else:  # a cut stream: some tokens, then EOF without finish_reason, usage or [DONE]
            events = chunks(response)
            assert events and "[DONE]" not in response.text
            assert all(e["choices"] and e["choices"][0]["finish_reason"] is None for e in events)
            assert all(not e.get("usage") for e in events)
    assert 0.15 <= broken / len(plan) <= 0.45
    assert sim.stats["by_fault"] == {kind: broken}
    assert sim.stats["completed"] == len(plan) - broken


def test_reset_fault_drops_the_connection(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(fault_rate=0.5, faults=["reset"], seed=3)
    plan = expected_faults(3, 0.5, ("reset",), 20)
    for planned in plan:
        if planned is None:
            assert client.post("/completions", json=COMPLETION).status_code == 200
        else:
            with pytest.raises(httpx.TransportError):
                client.post("/completions", json=COMPLETION)
    assert sim.stats["by_fault"] == {"reset": plan.count("reset")}
    assert "500" not in sim.stats["by_status"]


async def test_hang_fault_outlasts_the_client_timeout(sim: SimServer) -> None:
    sim.configure(fault_rate=0.4, faults=["hang"], hang_s=30.0, seed=5)
    plan = expected_faults(5, 0.4, ("hang",), 20)
    outcomes: list[str] = []
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=httpx.Timeout(5.0, read=0.3)) as client:

        async def one() -> None:
            try:
                response = await client.post("/chat/completions", json=CHAT)
                outcomes.append(str(response.status_code))
            except httpx.ReadTimeout:
                outcomes.append("timeout")

        async with anyio.create_task_group() as tg:
            for _ in plan:
                tg.start_soon(one)
    assert outcomes.count("timeout") == plan.count("hang") > 0
    assert outcomes.count("200") == plan.count(None)
    assert sim.stats["by_fault"] == {"hang": plan.count("hang")}


def test_fatal_status_answers_every_request(sim: SimServer, client: httpx.Client) -> None:
    sim.configure(fatal_status=401)
    for path, body in (("/chat/completions", CHAT), ("/completions", COMPLETION)):
        response = client.post(path, json=body)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    sim.configure(fatal_status=429)
    response = client.post("/chat/completions", json=CHAT)
    assert (response.status_code, response.json()["error"]["code"]) == (429, "insufficient_quota")
    assert sim.stats["by_status"] == {"401": 2, "429": 1}


def test_api_key_is_checked_and_never_shown(sim: SimServer, client: httpx.Client) -> None:
    secret = "sk-test-0123456789abcdef"
    sim.configure(api_key=secret)
    assert client.post("/chat/completions", json=CHAT).status_code == 401
    denied = client.post("/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    right = {"Authorization": f"Bearer {secret}"}
    assert client.post("/chat/completions", json=CHAT, headers=right).status_code == 200
    stats = client.get(f"{sim.url}/_sim/stats").text
    config = client.get(f"{sim.url}/_sim/config").text
    assert sim.stats["by_key"] == {"none": 1, key_label("wrong"): 1, key_label(secret): 1}
    assert secret not in stats and secret not in config and secret not in repr(sim.config)


# --- admin API and server --------------------------------------------------------------


async def test_latency_is_concurrent_and_counted(sim: SimServer) -> None:
    sim.configure(latency_ms=300)
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5,
                                 limits=httpx.Limits(max_connections=40)) as client:
        responses: list[httpx.Response] = []

        async def one(i: int) -> None:
            responses.append(await client.post("/completions", json={**COMPLETION, "prompt": f"p{i}"}))

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
    assert {r.status_code for r in responses} == {200}
    stats = sim.stats
    assert stats["max_in_flight"] == 40  # every request was waiting at the same time
    assert stats["in_flight"] == 0


def test_stats_counters(sim: SimServer, client: httpx.Client) -> None:
    client.post("/chat/completions", json=CHAT)
    client.post("/chat/completions", json=CHAT)
    client.post("/completions", json={**COMPLETION, **STREAM})
    client.post("/completions", json={"prompt": "no model"})
    stats = client.get(f"{sim.url}/_sim/stats").json()
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 3, "400": 1}
    assert stats["by_endpoint"] == {"chat": 2, "completions": 2}
    assert stats["by_key"] == {"none": 4}
    assert stats["completed"] == 3
    assert stats["ids_seen"] == 2 and stats["repeats"] == 1
    assert stats["prompt_tokens"] == 2 * count_prompt_tokens(CHAT) + count_prompt_tokens(COMPLETION)
    assert stats["completion_tokens"] == 2 * reply_for(CHAT)[1] + reply_for(COMPLETION)[1]
    assert stats == sim.stats


def test_admin_config_and_reset(sim: SimServer, client: httpx.Client) -> None:
    changed = client.post(f"{sim.url}/_sim/config", json={"fatal_status": 503, "faults": ["500", "cut"]})
    assert changed.status_code == 200
    assert changed.json()["fatal_status"] == 503 and changed.json()["faults"] == ["500", "cut"]
    assert client.post("/chat/completions", json=CHAT).status_code == 503
    assert sim.config.faults == ("500", "cut")
    assert client.post(f"{sim.url}/_sim/config", json={"no_such_knob": 1}).status_code == 400
    assert client.post(f"{sim.url}/_sim/config", json={"rpm": "ten"}).status_code == 400
    assert client.post(f"{sim.url}/_sim/config", json={"faults": ["meteor"]}).status_code == 400
    assert client.post(f"{sim.url}/_sim/config", json={"fatal_status": None}).status_code == 200
    assert client.post(f"{sim.url}/_sim/reset").status_code == 200
    assert sim.stats["requests"] == 0 and sim.stats["by_status"] == {}
    with pytest.raises(ValueError, match="unknown simulator setting"):
        sim.configure(latency=5)


def test_servers_get_their_own_ports_and_stop_cleanly() -> None:
    with SimServer(SimConfig(latency_ms=10)) as one, SimServer() as two:
        assert one.port != two.port
        assert one.base_url == f"http://127.0.0.1:{one.port}/v1"
        assert httpx.post(f"{two.base_url}/completions", json=COMPLETION).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{one.base_url}/completions", json=COMPLETION)


async def test_stop_drops_requests_still_in_flight() -> None:
    server = SimServer(SimConfig(fault_rate=1.0, faults=("hang",), hang_s=30.0)).start()
    errors: list[BaseException] = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:

        async def held() -> None:
            try:
                await client.post("/completions", json=COMPLETION)
            except httpx.TransportError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(held)
            while server.stats["in_flight"] == 0:
                await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(server.stop)
    assert len(errors) == 1  # the connection was dropped, not answered with a 500

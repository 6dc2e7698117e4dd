"""The simulator's ASGI app: routes, the admin API, and one request as a chain of steps.

A completion request goes authorize -> parse -> admit -> fault -> answer; each step
either hands the next one what it needs or returns the reply that ends the request.

The app is a plain ASGI callable served by uvicorn, not a Starlette router: the
request path is a dict lookup and one ``orjson`` round trip, several times faster
than routing through Starlette (see ``benchmarks/throughput.py``). Like a Starlette
app it carries ``app.state.sim`` (the :class:`SimState` with config and counters).

Admin API (outside ``/v1``, never rate limited, faulted or key-checked):
``GET /_sim/stats``, ``GET /_sim/config``, ``POST /_sim/config`` (a JSON object of
:class:`SimConfig` fields to change), ``POST /_sim/reset`` (counters, rate
windows and the fault RNG).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from batch.simulator import bodies, embeddings, faults, replies, structured
from batch.simulator.replies import Reply
from batch.simulator.settings import SimConfig, public_config
from batch.simulator.state import SimState

__all__ = ["SimApp", "create_app"]

MAX_BODY_BYTES = 16 * 2**20

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A reply that ends a request before it is answered."""

    status: int
    body: bytes
    headers: _Headers = ()
    content_type: bytes = b"application/json"


@dataclass(frozen=True, slots=True)
class _Request:
    """A parsed completion request and the replies it will get."""

    chat: bool
    body: dict[str, Any]
    n: int
    max_tokens: int | None
    digests: list[bytes]
    replies: list[Reply]
    prompt_tokens: int

    @property
    def reserve(self) -> int:
        """The tokens it may use: prompt + max_tokens (else its reply) per choice."""
        each = self.max_tokens if self.max_tokens is not None else self.replies[0][1]
        return self.prompt_tokens + each * self.n


class _BadRequest(Exception):
    pass


def _refuse(status: int, message: str, code: str | None = None, headers: _Headers = ()) -> _Refusal:
    return _Refusal(status, bodies.error_body(status, message, code), headers)


# --- the steps that need no I/O ----------------------------------------------------------------


def authorize(sim: SimState, scope: Scope) -> _Refusal | None:
    """Count the key presented; refuse with the fatal status, or 401 for a wrong key."""
    config = sim.config
    presented: str | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            auth = value.decode("latin-1")
            presented = auth[7:] if auth[:7].lower() == "bearer " else auth
            break
    sim.count_key(presented)
    if config.fatal_status is not None and sim.requests > config.fatal_after:
        status = config.fatal_status
        return _refuse(status, f"simulated fatal status {status}")
    if config.api_key is not None and presented != config.api_key:
        return _refuse(401, "missing API key" if presented is None else "invalid API key")
    return None


def _check_body(body: dict[str, Any], chat: bool) -> int:
    """Validate what the simulator relies on; returns n."""
    if not isinstance(body.get("model"), str):
        raise _BadRequest("'model' is required and must be a string")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _BadRequest("each message must be an object with a 'role'")
    elif not isinstance(body.get("prompt"), str | list):
        raise _BadRequest("'prompt' must be a string or a list")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise _BadRequest("'n' must be an integer from 1 to 16")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _BadRequest(f"'{name}' must be a positive integer")
    return n


def parse(sim: SimState, raw: bytes, chat: bool) -> _Request | _Refusal:
    """The request body checked, and the replies it gets (400 when it is not a valid request)."""
    try:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        n = _check_body(body, chat)
    except _BadRequest as exc:
        return _refuse(400, str(exc))
    max_tokens = replies.max_tokens(body)
    digests = [replies.digest(body, i) for i in range(n)]
    sim.count_seen(digests[0][:16])
    sim.note_params(body)
    schema = structured.schema_of(body)
    if schema is None:
        answers = [replies.answer(body, d, max_tokens) for d in digests]
    else:
        asked = sim.count_asked(digests[0][:16])
        rate = sim.config.invalid_output_rate
        answers = [structured.structured_reply(schema, d, asked, rate, max_tokens) for d in digests]
    return _Request(chat, body, n, max_tokens, digests, answers, replies.count_prompt_tokens(body))


def admit(sim: SimState, request: _Request | embeddings.EmbedRequest) -> _Headers | _Refusal:
    """The context length, then the rate window; the rate-limit headers to answer with."""
    config = sim.config
    if config.context_tokens is not None and request.reserve > config.context_tokens:
        message = (f"This model's maximum context length is {config.context_tokens} tokens; "
                   f"the request asks for {request.reserve} ({request.prompt_tokens} in the prompt).")
        return _refuse(400, message, "context_length_exceeded")
    if config.rpm is None and config.tpm is None:
        return ()
    admitted, wait = sim.admit(request.reserve)
    openai_style = config.limit_style == "openai"
    if not admitted:
        sim.rate_limited += 1
        if not openai_style:
            bare = orjson.dumps({"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}})
            return _Refusal(429, bare)
        message = "Rate limit reached (simulated); retry later."
        return _refuse(429, message, "rate_limit_exceeded", sim.limit_headers(wait))
    return sim.limit_headers(None) if openai_style else ()


# --- the app -----------------------------------------------------------------------------------


class SimApp:
    """The simulator as a raw ASGI app; ``state.sim`` is its :class:`SimState`."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.sim = SimState(config, clock)
        self.state = SimpleNamespace(sim=self.sim)
        self.sleep = sleep
        self._routes: dict[tuple[str, str], Callable[[Receive, Send], Awaitable[None]]] = {
            ("GET", "/v1/models"): self._models,
            ("GET", "/_sim/stats"): self._stats,
            ("GET", "/_sim/config"): self._get_config,
            ("POST", "/_sim/config"): self._set_config,
            ("POST", "/_sim/reset"): self._reset,
        }
        self._completions = {("POST", "/v1/chat/completions"): True, ("POST", "/v1/completions"): False}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        route = (scope["method"], scope["path"])
        chat = self._completions.get(route)
        if chat is not None:
            await self._complete(scope, receive, send, chat)
            return
        if route == ("POST", "/v1/embeddings"):
            await self._embed(scope, receive, send)
            return
        handler = self._routes.get(route)
        if handler is None:
            await _send(send, 404, bodies.error_body(404, f"no route {scope['path']}"))
            return
        await handler(receive, send)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- admin ---

    async def _stats(self, receive: Receive, send: Send) -> None:
        await _send(send, 200, orjson.dumps(self.sim.snapshot()))

    async def _get_config(self, receive: Receive, send: Send) -> None:
        await _send(send, 200, orjson.dumps(public_config(self.sim.config)))

    async def _set_config(self, receive: Receive, send: Send) -> None:
        try:
            changes = orjson.loads(await _read_body(receive))
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of simulator settings")
            config = self.sim.configure(changes)
        except (ValueError, TypeError, _BadRequest) as exc:
            await _send(send, 400, bodies.error_body(400, str(exc)))
            return
        await _send(send, 200, orjson.dumps(public_config(config)))

    async def _reset(self, receive: Receive, send: Send) -> None:
        self.sim.reset()
        await _send(send, 200, b'{"reset":true}')

    async def _models(self, receive: Receive, send: Send) -> None:
        body = {"object": "list", "data": [{"id": "sim-model", "object": "model", "owned_by": "promptmill"}]}
        await _send(send, 200, orjson.dumps(body))

    # --- embeddings ---

    async def _embed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """authorize -> parse -> admit -> fault -> answer, as for a completion (no streams)."""
        sim = self.sim
        sim.requests += 1
        sim.count(sim.by_endpoint, "embeddings")
        step: embeddings.EmbedRequest | _Headers | _Refusal | None = authorize(sim, scope)
        if step is None:
            try:
                request = embeddings.parse(await _read_body(receive), sim.config.embedding_dim)
            except (embeddings.BadEmbedRequest, _BadRequest) as exc:
                step = _refuse(400, str(exc))
            else:
                step = admit(sim, request)
                if not isinstance(step, _Refusal):
                    fault = await self._fault(receive, send)
                    if fault != "done":
                        if sim.config.latency_ms > 0:
                            await self.sleep(sim.config.latency_ms / 1000)
                        sim.count(sim.by_status, "200")
                        await _send(send, 200, faults.break_body(embeddings.answer(request), fault), step)
                        if fault is None:
                            sim.count_answered(request.prompt_tokens, 0)
                    return
        assert isinstance(step, _Refusal)
        sim.count(sim.by_status, str(step.status))
        await _send(send, step.status, step.body, step.headers, step.content_type)

    # --- completions ---

    async def _complete(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        sim = self.sim
        sim.requests += 1
        sim.in_flight += 1
        sim.max_in_flight = max(sim.max_in_flight, sim.in_flight)
        try:
            await self._handle(scope, receive, send, chat)
        except asyncio.CancelledError:
            # The server is stopping under a request that sleeps (latency, a stream, a hang):
            # its connection is dropped, not answered with a 500 (if its answer had not started).
            await faults.drop(send)
            raise
        finally:
            sim.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        sim = self.sim
        arrived = sim.clock()
        sim.count(sim.by_endpoint, "chat" if chat else "completions")
        step: _Request | _Headers | _Refusal | None = authorize(sim, scope)
        if step is None:
            try:
                step = parse(sim, await _read_body(receive), chat)
            except _BadRequest as exc:
                step = _refuse(400, str(exc))
            if isinstance(step, _Request):
                request = step
                step = admit(sim, request)
                if not isinstance(step, _Refusal):
                    fault = await self._fault(receive, send)
                    if fault != "done":
                        await self._answer(send, request, step, fault, arrived)
                    return
        assert isinstance(step, _Refusal)  # every other step went on to the answer
        sim.count(sim.by_status, str(step.status))
        await _send(send, step.status, step.body, step.headers, step.content_type)

    async def _fault(self, receive: Receive, send: Send) -> str | None:
        """The fault drawn for this request: answered here ("done"), or the one to answer with."""
        sim = self.sim
        fault = faults.pick(sim.config, sim.rng)
        if fault is None:
            return None
        sim.count(sim.by_fault, fault)
        if fault in ("500", "503", "502"):
            status = int(fault)
            body = faults.BAD_GATEWAY_HTML if fault == "502" else bodies.error_body(status, "simulated server error")
            sim.count(sim.by_status, fault)
            await _send(send, status, body, content_type=b"text/html" if fault == "502" else b"application/json")
            return "done"
        if fault == "reset":
            await faults.drop(send)
        if fault == "hang":
            await faults.hold(receive, sim.config.hang_s)
            return None  # the client is gone, or it waited it out and gets its answer
        return fault  # "malformed" and "cut" break the answer

    async def _answer(self, send: Send, request: _Request, headers: _Headers, fault: str | None,
                      arrived: float) -> None:
        sim, config, body = self.sim, self.sim.config, request.body
        number, created = sim.next_id(), int(time.time())
        usage = bodies.usage_of(request.prompt_tokens, request.replies)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            events, finish_at = bodies.stream_events(
                request.chat, number, created, body.get("model"), request.replies, usage,
                include_usage=include_usage, every_chunk=config.usage_every_chunk, done=config.stream_done)
            await self._stream(send, faults.break_events(events, finish_at, fault), headers)
        else:
            if config.latency_ms > 0:
                # the latency runs from the request's arrival, not from the end of our own work on it
                await self.sleep(max(config.latency_ms / 1000 - (sim.clock() - arrived), 0.0))
            payload = bodies.completion(request.chat, number, created, body.get("model"), request.replies,
                                        usage, request.digests[0][:16].hex())
            sim.count(sim.by_status, "200")
            await _send(send, 200, faults.break_body(payload, fault), headers)
        if fault is None:
            sim.count_answered(request.prompt_tokens, usage["completion_tokens"])

    async def _stream(self, send: Send, events: list[tuple[bytes, bool]], headers: _Headers) -> None:
        """Send the events: the first token after ttft, the rest spread over the latency."""
        config = self.sim.config
        latency = config.latency_ms / 1000
        ttft = latency / 4 if config.ttft_ms is None else config.ttft_ms / 1000
        tokens = sum(1 for _, is_token in events if is_token) or 1
        gap = max(latency - ttft, 0.0) / tokens

        self.sim.count(self.sim.by_status, "200")
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *headers]})
        if config.keepalive:
            await send({"type": "http.response.body", "body": bodies.KEEPALIVE, "more_body": True})
        if ttft > 0:
            await self.sleep(ttft)
        if gap > 0:
            first = True
            for data, is_token in events:
                if is_token:
                    if not first:
                        await self.sleep(gap)
                    first = False
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if config.keepalive:
                await send({"type": "http.response.body", "body": bodies.KEEPALIVE, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            tail = [bodies.KEEPALIVE] if config.keepalive else []
            await send({"type": "http.response.body", "body": b"".join([*(d for d, _ in events), *tail])})


async def _send(send: Send, status: int, body: bytes, headers: _Headers = (),
                content_type: bytes = b"application/json") -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BadRequest("request body too large")
        parts.append(chunk)
    return b"".join(parts)


def create_app(config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> SimApp:
    """The simulator's ASGI app; ``app.state.sim`` holds its config and counters."""
    return SimApp(config or SimConfig(), clock=clock, sleep=sleep)

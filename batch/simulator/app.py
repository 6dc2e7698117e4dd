"""An OpenAI-compatible completion server for demos, tests and benchmarks.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed
(server-sent events) or not, with deterministic replies and exact usage, and it
misbehaves on demand: latency, sliding-window RPM/TPM limits answered with 429
(OpenAI style with ``x-ratelimit-*`` and ``Retry-After`` headers, or Atoma style,
bare), seeded faults, a fatal status for every request (or every one after the
first N), a context length answered with 400, and an API-key check.

Replies are a pure function of the request body (see :func:`reply_for` and
:func:`count_prompt_tokens`), so a test can compute the text and usage it expects:

* prompt tokens: whitespace-separated words of every message's text content plus
  one per message (chat), or the words of the prompt (completions; a list of
  strings counts each, a list of token ids counts its length);
* reply: 5 to 32 words drawn from a fixed vocabulary by a hash of (model,
  messages or prompt, seed, choice index); completion tokens are its words, cut to
  ``max_tokens`` (``finish_reason`` "length" when cut, else "stop"). With ``n`` > 1
  the usage counts the words of every choice.

The app is a plain ASGI callable served by uvicorn, not a Starlette router: the
request path is a dict lookup and one ``orjson`` round trip, which measured
several times faster than routing through Starlette (the benchmarks drive it at
thousands of requests per second on one core). Like a Starlette app it carries
``app.state.sim`` (the :class:`SimState` with config and counters).

Admin API (outside ``/v1``, never rate limited, faulted or key-checked):
``GET /_sim/stats``, ``GET /_sim/config``, ``POST /_sim/config`` (a JSON object of
:class:`SimConfig` fields to change), ``POST /_sim/reset`` (counters, rate
windows and the fault RNG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import orjson
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    import uvicorn  # loaded by what serves: `promptmill run` only parses the simulator's options

__all__ = [
    "FAULT_KINDS",
    "SimApp",
    "SimConfig",
    "SimServer",
    "SimState",
    "add_simulator_arguments",
    "config_from_args",
    "count_prompt_tokens",
    "create_app",
    "key_label",
    "main",
    "reply_for",
    "serve",
]

logger = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("500", "502", "503", "reset", "hang", "malformed", "cut")
LimitStyle = Literal["openai", "atoma"]

MAX_BODY_BYTES = 16 * 2**20
SYSTEM_FINGERPRINT = "fp_promptmill_sim"

_WORDS = (
    "amber", "anchor", "april", "arrow", "aspen", "atlas", "autumn", "basil",
    "beacon", "birch", "bloom", "breeze", "brook", "canyon", "cedar", "cinder",
    "clover", "comet", "copper", "coral", "crane", "dawn", "delta", "dune",
    "ember", "falcon", "fern", "fjord", "flint", "forest", "garnet", "glacier",
    "harbor", "hazel", "heron", "indigo", "island", "ivory", "jade", "juniper",
    "kestrel", "lagoon", "lantern", "laurel", "linen", "lotus", "maple", "meadow",
    "mesa", "mist", "nectar", "north", "oak", "ocean", "onyx", "orchid",
    "pebble", "pine", "prairie", "quartz", "raven", "ridge", "river", "sable",
)  # fmt: skip


@dataclass
class SimConfig:
    """Every knob of the simulator; change at run time with the admin API or ``configure``."""

    latency_ms: float = 0.0  # before a non-streamed answer; spread over a stream
    ttft_ms: float | None = None  # streams: before the first token (None: latency_ms / 4)
    rpm: int | None = None
    tpm: int | None = None  # counts prompt tokens + max_tokens * n at admission
    window_s: float = 60.0  # sliding window of rpm and tpm
    limit_style: LimitStyle = "openai"
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    seed: int = 0  # seeds the fault RNG
    fatal_status: int | None = None  # answer every API request with this status
    fatal_after: int = 0  # ... but only after this many API requests were answered normally
    context_tokens: int | None = None  # prompt + max_tokens * n above this: 400 context_length_exceeded
    stream_done: bool = True  # end streams with "data: [DONE]" (False: Atoma, EOF after usage)
    usage_every_chunk: bool = False  # cumulative usage in every stream chunk
    keepalive: bool = False  # ":keep-alive" comment lines in streams
    hang_s: float = 30.0  # the "hang" fault holds the request this long (or until the client leaves)
    api_key: str | None = field(default=None, repr=False)  # require "Authorization: Bearer <key>"

    def __post_init__(self) -> None:
        _validate(self)


def _validate(config: SimConfig) -> None:
    if config.limit_style not in ("openai", "atoma"):
        raise ValueError(f"limit_style must be 'openai' or 'atoma', not {config.limit_style!r}")
    config.faults = tuple(config.faults)
    unknown = [kind for kind in config.faults if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    if not 0.0 <= config.fault_rate <= 1.0:
        raise ValueError(f"fault_rate must be between 0 and 1, not {config.fault_rate}")
    if config.fault_rate > 0 and not config.faults:
        raise ValueError("fault_rate is set but faults is empty")
    for name in ("rpm", "tpm"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, not {value}")
    if config.window_s <= 0:
        raise ValueError(f"window_s must be positive, not {config.window_s}")
    if config.latency_ms < 0 or (config.ttft_ms is not None and config.ttft_ms < 0):
        raise ValueError("latency_ms and ttft_ms must not be negative")
    if config.hang_s < 0:
        raise ValueError(f"hang_s must not be negative, not {config.hang_s}")
    if config.fatal_status is not None and not 400 <= config.fatal_status <= 599:
        raise ValueError(f"fatal_status must be a 4xx or 5xx status, not {config.fatal_status}")
    if config.fatal_after < 0:
        raise ValueError(f"fatal_after must not be negative, not {config.fatal_after}")
    if config.context_tokens is not None and config.context_tokens <= 0:
        raise ValueError(f"context_tokens must be positive, not {config.context_tokens}")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "latency_ms": (int, float),
    "ttft_ms": (int, float, type(None)),
    "rpm": (int, type(None)),
    "tpm": (int, type(None)),
    "window_s": (int, float),
    "limit_style": (str,),
    "fault_rate": (int, float),
    "faults": (list, tuple),
    "seed": (int,),
    "fatal_status": (int, type(None)),
    "fatal_after": (int,),
    "context_tokens": (int, type(None)),
    "stream_done": (bool,),
    "usage_every_chunk": (bool,),
    "keepalive": (bool,),
    "hang_s": (int, float),
    "api_key": (str, type(None)),
}


def changed_config(config: SimConfig, changes: Mapping[str, Any]) -> SimConfig:
    """A validated copy of ``config`` with ``changes`` (JSON-shaped values accepted).

    Raises ``ValueError`` naming the setting that is unknown, of the wrong type or out of range.
    """
    for name, value in changes.items():
        types = _FIELD_TYPES.get(name)
        if types is None:
            raise ValueError(f"unknown simulator setting {name!r}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"simulator setting {name!r} has the wrong type")
    fields = dict(changes)
    if "faults" in fields:
        fields["faults"] = tuple(str(kind) for kind in fields["faults"])
    return dataclasses.replace(config, **fields)


def _public_config(config: SimConfig) -> dict[str, Any]:
    """The config as JSON; the API key is never shown, only whether one is set."""
    out = dataclasses.asdict(config)
    out["api_key"] = "***" if config.api_key is not None else None
    out["faults"] = list(config.faults)
    return out


# --- deterministic replies -------------------------------------------------------------


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.split())
            elif isinstance(part, str):
                total += len(part.split())
        return total
    return 0


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens the simulator reports for ``body``.

    Chat: the whitespace-split words of each message's text content, plus one per
    message. Completions: the words of the prompt (a list of strings: of each; a
    list of token ids: its length).
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 0
        for message in messages:
            total += 1
            if isinstance(message, dict):
                total += _content_words(message.get("content"))
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        if all(isinstance(item, int) for item in prompt):
            return len(prompt)
        return sum(_content_words(item) for item in prompt)
    return 0


def _digest(body: Mapping[str, Any], index: int) -> bytes:
    content = body.get("messages") if "messages" in body else body.get("prompt")
    key = orjson.dumps(
        [body.get("model"), content, body.get("seed"), index],
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
        default=str,
    )
    return hashlib.blake2b(key, digest_size=40).digest()


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_tokens")
    if value is None:
        value = body.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _reply_from_digest(digest: bytes, max_tokens: int | None) -> tuple[str, int, str]:
    count = 5 + digest[0] % 28
    finish = "stop"
    if max_tokens is not None and max_tokens < count:
        count = max(max_tokens, 0)
        finish = "length"
    words = [_WORDS[digest[i + 1] % len(_WORDS)] for i in range(count)]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words), count, finish


def reply_for(body: Mapping[str, Any], index: int = 0) -> tuple[str, int, str]:
    """``(text, completion_tokens, finish_reason)`` of choice ``index`` for ``body``.

    A pure function of model, messages/prompt, seed, choice index and max_tokens
    (or max_completion_tokens); the full reply has 5 to 32 words, one token each.
    """
    return _reply_from_digest(_digest(body, index), _max_tokens(body))


def key_label(api_key: str | None) -> str:
    """How the stats name an API key: a short hash, never the key itself."""
    if api_key is None:
        return "none"
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


# --- state: counters and rate windows --------------------------------------------------


class _BadRequest(Exception):
    pass


class SimState:
    """Config, counters, rate windows and the fault RNG; lives on the event loop."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._ids = 0
        self.labels: dict[str | None, str] = {}  # key -> key_label(key), to hash each key once
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.by_fault: dict[str, int] = {}
        self.by_endpoint: dict[str, int] = {}
        self.completed = 0
        self.rate_limited = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: set[bytes] = set()
        self.repeats = 0
        self.req_times: deque[float] = deque()
        self.tok_times: deque[tuple[float, int]] = deque()
        self.tok_sum = 0
        self.rng = random.Random(self.config.seed)

    def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        new = changed_config(self.config, changes)
        if new.seed != self.config.seed:
            self.rng = random.Random(new.seed)
        self.config = new
        return new

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_key": dict(self.by_key),
            "by_fault": dict(self.by_fault),
            "by_endpoint": dict(self.by_endpoint),
            "completed": self.completed,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ids_seen": len(self.seen),
            "repeats": self.repeats,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def count_status(self, status: int) -> None:
        key = str(status)
        self.by_status[key] = self.by_status.get(key, 0) + 1

    # Sliding window: admitted requests (and their token reservations) within window_s.
    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_s
        times = self.req_times
        while times and times[0] <= horizon:
            times.popleft()
        toks = self.tok_times
        while toks and toks[0][0] <= horizon:
            self.tok_sum -= toks.popleft()[1]

    def admit(self, cost: int) -> tuple[bool, float]:
        """Admit one request costing ``cost`` tokens, or say how long until it would fit."""
        config = self.config
        now = self.clock()
        self._prune(now)
        wait = 0.0
        if config.rpm is not None and len(self.req_times) >= config.rpm:
            oldest = self.req_times[len(self.req_times) - config.rpm]
            wait = oldest + config.window_s - now
        if config.tpm is not None and self.tok_sum + cost > config.tpm:
            if cost > config.tpm:
                wait = max(wait, config.window_s)
            else:
                freed, need = 0, self.tok_sum + cost - config.tpm
                for stamp, tokens in self.tok_times:
                    freed += tokens
                    if freed >= need:
                        wait = max(wait, stamp + config.window_s - now)
                        break
        if wait > 0:
            return False, wait
        if config.rpm is not None:
            self.req_times.append(now)
        if config.tpm is not None:
            self.tok_times.append((now, cost))
            self.tok_sum += cost
        return True, 0.0

    def limit_headers(self, retry_after: float | None) -> list[tuple[bytes, bytes]]:
        config = self.config
        now = self.clock()
        headers: list[tuple[bytes, bytes]] = []
        if config.rpm is not None:
            remaining = max(config.rpm - len(self.req_times), 0)
            reset = self.req_times[0] + config.window_s - now if self.req_times else 0.0
            headers += [
                (b"x-ratelimit-limit-requests", str(config.rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(remaining).encode()),
                (b"x-ratelimit-reset-requests", _duration(reset).encode()),
            ]
        if config.tpm is not None:
            remaining = max(config.tpm - self.tok_sum, 0)
            reset = self.tok_times[0][0] + config.window_s - now if self.tok_times else 0.0
            headers += [
                (b"x-ratelimit-limit-tokens", str(config.tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(remaining).encode()),
                (b"x-ratelimit-reset-tokens", _duration(reset).encode()),
            ]
        if retry_after is not None:
            headers += [
                (b"retry-after", str(max(1, math.ceil(retry_after))).encode()),
                (b"retry-after-ms", str(max(1, math.ceil(retry_after * 1000))).encode()),
            ]
        return headers


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


# --- the ASGI app ----------------------------------------------------------------------

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"

_ERROR_CODES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    402: "insufficient_balance",
    403: "permission_denied",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    422: "unprocessable_entity",
    429: "insufficient_quota",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_BAD_GATEWAY_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center></body></html>\n"
)


def _error_body(status: int, message: str, code: str | None = None) -> bytes:
    code = code or _ERROR_CODES.get(status, "error")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _abort(receive: Receive) -> bool:
    """Drop the connection with a TCP reset, no response at all.

    ASGI has no reset; uvicorn's request cycle (the owner of ``receive``) holds the
    transport. Returns False when the server is not one we know how to reach into.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True


class SimApp:
    """The simulator as a raw ASGI app; ``state.sim`` is its :class:`SimState`."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.sim = SimState(config, clock)
        self.state = SimpleNamespace()
        self.state.sim = self.sim
        self.sleep = sleep
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("GET", "/v1/models"): self._models,
            ("GET", "/_sim/stats"): self._stats,
            ("GET", "/_sim/config"): self._get_config,
            ("POST", "/_sim/config"): self._set_config,
            ("POST", "/_sim/reset"): self._reset,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is None:
            await self._send(send, 404, _error_body(404, f"no route {scope['path']}"))
            return
        await handler(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _send(send: Send, status: int, body: bytes,
                    headers: Sequence[tuple[bytes, bytes]] = (), content_type: bytes = b"application/json") -> None:
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
        })
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, send: Send, status: int, body: bytes,
                       headers: Sequence[tuple[bytes, bytes]] = (), content_type: bytes = b"application/json") -> None:
        self.sim.count_status(status)
        await self._send(send, status, body, headers, content_type)

    @staticmethod
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

    # --- admin ---

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._send(send, 200, orjson.dumps(self.sim.snapshot()))

    async def _get_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._send(send, 200, orjson.dumps(_public_config(self.sim.config)))

    async def _set_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            changes = orjson.loads(await self._read_body(receive))
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of simulator settings")
            config = self.sim.configure(changes)
        except (ValueError, TypeError, _BadRequest) as exc:
            await self._send(send, 400, _error_body(400, str(exc)))
            return
        await self._send(send, 200, orjson.dumps(_public_config(config)))

    async def _reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.sim.reset()
        await self._send(send, 200, b'{"reset":true}')

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = {"object": "list", "data": [{"id": "sim-model", "object": "model", "owned_by": "promptmill"}]}
        await self._send(send, 200, orjson.dumps(body))

    # --- completions ---

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete(scope, receive, send, chat=True)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete(scope, receive, send, chat=False)

    async def _complete(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        sim = self.sim
        sim.requests += 1
        sim.in_flight += 1
        if sim.in_flight > sim.max_in_flight:
            sim.max_in_flight = sim.in_flight
        try:
            await self._handle(scope, receive, send, chat)
        except asyncio.CancelledError:
            # The server is stopping under a request that sleeps (latency, a stream, a hang):
            # drop its connection quietly rather than let uvicorn answer 500 and log a traceback.
            if not _abort(receive):
                raise
            await _wait_disconnect(receive)
        finally:
            sim.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        sim = self.sim
        arrived = sim.clock()
        config = sim.config
        endpoint = "chat" if chat else "completions"
        sim.by_endpoint[endpoint] = sim.by_endpoint.get(endpoint, 0) + 1

        presented: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
                presented = auth[7:] if auth[:7].lower() == "bearer " else auth
                break
        label = sim.labels.get(presented)
        if label is None:
            label = key_label(presented)
            if len(sim.labels) < 4096:
                sim.labels[presented] = label
        sim.by_key[label] = sim.by_key.get(label, 0) + 1

        if config.fatal_status is not None and sim.requests > config.fatal_after:
            status = config.fatal_status
            await self._respond(send, status, _error_body(status, f"simulated fatal status {status}"))
            return
        if config.api_key is not None and presented != config.api_key:
            message = "missing API key" if presented is None else "invalid API key"
            await self._respond(send, 401, _error_body(401, message))
            return

        try:
            raw = await self._read_body(receive)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _BadRequest("the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            n, max_tokens = _check_body(body, chat)
        except _BadRequest as exc:
            await self._respond(send, 400, _error_body(400, str(exc)))
            return

        digests = [_digest(body, i) for i in range(n)]
        seen_key = digests[0][:16]
        if seen_key in sim.seen:
            sim.repeats += 1
        else:
            sim.seen.add(seen_key)
        replies = [_reply_from_digest(d, max_tokens) for d in digests]
        prompt_tokens = count_prompt_tokens(body)
        if config.context_tokens is not None:
            wanted = prompt_tokens + (max_tokens if max_tokens is not None else replies[0][1]) * n
            if wanted > config.context_tokens:
                message = (f"This model's maximum context length is {config.context_tokens} tokens; "
                           f"the request asks for {wanted} ({prompt_tokens} in the prompt).")
                await self._respond(send, 400, _error_body(400, message, "context_length_exceeded"))
                return

        limited = config.rpm is not None or config.tpm is not None
        headers: list[tuple[bytes, bytes]] = []
        if limited:
            reserve = max_tokens if max_tokens is not None else replies[0][1]
            admitted, wait = sim.admit(prompt_tokens + reserve * n)
            openai_style = config.limit_style == "openai"
            if not admitted:
                sim.rate_limited += 1
                if openai_style:
                    error = _error_body(429, "Rate limit reached (simulated); retry later.", "rate_limit_exceeded")
                    await self._respond(send, 429, error, sim.limit_headers(wait))
                else:
                    error = orjson.dumps({"error": {"code": "TOO_MANY_REQUESTS", "message": "Too many requests"}})
                    await self._respond(send, 429, error)
                return
            if openai_style:
                headers = sim.limit_headers(None)

        fault = None
        if config.fault_rate > 0 and sim.rng.random() < config.fault_rate:
            fault = config.faults[sim.rng.randrange(len(config.faults))]
            sim.by_fault[fault] = sim.by_fault.get(fault, 0) + 1
            if fault in ("500", "503"):
                status = int(fault)
                await self._respond(send, status, _error_body(status, "simulated server error"))
                return
            if fault == "502":
                await self._respond(send, 502, _BAD_GATEWAY_HTML, content_type=b"text/html")
                return
            if fault == "reset":
                if _abort(receive):
                    await _wait_disconnect(receive)
                    return
                raise ConnectionResetError("simulated connection reset")
            if fault == "hang":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_wait_disconnect(receive), config.hang_s)
                fault = None  # the client is gone, or it waited it out and gets its answer

        model = body.get("model")
        created = int(time.time())
        number = sim.next_id()
        completion_tokens = sum(reply[1] for reply in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            await self._stream(send, chat, number, created, model, replies, usage, include_usage, headers, fault)
            return

        if config.latency_ms > 0:
            # the latency runs from the request's arrival, not from the end of our own work on it
            await self.sleep(max(config.latency_ms / 1000 - (sim.clock() - arrived), 0.0))
        if chat:
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": text},
                 "logprobs": None, "finish_reason": finish}
                for i, (text, _, finish) in enumerate(replies)
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, _, finish) in enumerate(replies)
            ]
        payload = orjson.dumps({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-sim{number:010d}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage,
            "response_hash": digests[0][:16].hex(),
            "signature": "c2ltdWxhdGVk",
        })
        if fault == "malformed":
            payload = payload[: len(payload) // 3] + b',,}"broken'
        elif fault == "cut":
            payload = payload[: len(payload) // 2]
        else:
            sim.completed += 1
            sim.prompt_tokens += prompt_tokens
            sim.completion_tokens += completion_tokens
        await self._respond(send, 200, payload, headers)

    async def _stream(self, send: Send, chat: bool, number: int, created: int, model: Any,
                      replies: list[tuple[str, int, str]], usage: dict[str, Any], include_usage: bool,
                      headers: list[tuple[bytes, bytes]], fault: str | None) -> None:
        sim = self.sim
        config = sim.config
        every = config.usage_every_chunk
        base: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-sim{number:010d}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        prompt_tokens = usage["prompt_tokens"]
        produced = 0

        def event(choice: dict[str, Any] | None) -> bytes:
            chunk = dict(base)
            chunk["choices"] = [] if choice is None else [choice]
            if every:
                chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                                  "total_tokens": prompt_tokens + produced}
            elif include_usage:
                chunk["usage"] = None
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        # The events, each with whether it carries a token (delays go between tokens).
        events: list[tuple[bytes, bool]] = []
        finish_at = -1
        for i, (text, _, finish) in enumerate(replies):
            if chat:
                events.append((event({"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}), False))
            for w, word in enumerate(text.split(" ") if text else ()):
                produced += 1
                piece = word if w == 0 else " " + word
                if chat:
                    choice = {"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                else:
                    choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": None}
                events.append((event(choice), True))
            if finish_at < 0:
                finish_at = len(events)
            if chat:
                choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": "", "logprobs": None, "finish_reason": finish}
            events.append((event(choice), False))
        if include_usage and not every:
            chunk = dict(base)
            chunk["choices"] = []
            chunk["usage"] = usage
            events.append((b"data: " + orjson.dumps(chunk) + b"\n\n", False))
        if config.stream_done:
            events.append((_DONE, False))

        if fault == "cut":
            events = events[: max(1, finish_at // 2 + 1)]
        elif fault == "malformed":
            events = [*events[:1], (b'data: {"id": "broken", "choices": [{"delta":\n\n', False)]

        latency = config.latency_ms / 1000
        ttft = latency / 4 if config.ttft_ms is None else config.ttft_ms / 1000
        tokens = sum(1 for _, is_token in events if is_token) or 1
        gap = max(latency - ttft, 0.0) / tokens

        sim.count_status(200)
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *headers]})
        if config.keepalive:
            await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
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
                await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            tail = [_KEEPALIVE] if config.keepalive else []
            await send({"type": "http.response.body", "body": b"".join([*(d for d, _ in events), *tail])})
        if fault is None:
            sim.completed += 1
            sim.prompt_tokens += prompt_tokens
            sim.completion_tokens += usage["completion_tokens"]


def _check_body(body: dict[str, Any], chat: bool) -> tuple[int, int | None]:
    """Validate what the simulator relies on; returns (n, max_tokens)."""
    if not isinstance(body.get("model"), str):
        raise _BadRequest("'model' is required and must be a string")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _BadRequest("each message must be an object with a 'role'")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
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
    return n, _max_tokens(body)


def create_app(config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> SimApp:
    """The simulator's ASGI app; ``app.state.sim`` holds its config and counters."""
    return SimApp(config or SimConfig(), clock=clock, sleep=sleep)


# --- serving ---------------------------------------------------------------------------


def _uvicorn_server(app: SimApp, host: str, port: int) -> uvicorn.Server:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        lifespan="off",
        access_log=False,
        log_config=None,  # leave the application's logging alone
        timeout_graceful_shutdown=1,
    ))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return None
    return uvloop.new_event_loop


class SimServer:
    """The simulator on a free loopback port, served from a background thread.

    >>> with SimServer(SimConfig(latency_ms=50)) as sim:
    ...     url = sim.base_url   # "http://127.0.0.1:<port>/v1"
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_app(config)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root (the admin API lives at ``{url}/_sim/...``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        return self.app.sim.config

    @property
    def stats(self) -> dict[str, Any]:
        """The counters of ``GET /_sim/stats``."""
        stats: dict[str, Any] = self._call(self.app.sim.snapshot)
        return stats

    def configure(self, **changes: Any) -> SimConfig:
        """Change settings at run time (same names as :class:`SimConfig`)."""
        config: SimConfig = self._call(lambda: self.app.sim.configure(changes))
        return config

    def reset_stats(self) -> None:
        self._call(self.app.sim.reset)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (state is only touched there), or here if stopped."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    def start(self) -> SimServer:
        if self._thread is not None:
            raise RuntimeError("the simulator is already started")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name="promptmill-simulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not (self._server is not None and self._server.started):
            if not self._thread.is_alive():
                self._thread = None
                raise RuntimeError("the simulator failed to start") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator did not start within 10 s")
            time.sleep(0.002)
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve(sock))
        except BaseException as exc:
            self._error = exc
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._server = _uvicorn_server(self.app, self.host, self.port)
        self._loop = asyncio.get_running_loop()
        await self._server.serve(sockets=[sock])

    def stop(self) -> None:
        """Stop at once: open keep-alive connections and hung requests are not waited for."""
        thread, server = self._thread, self._server
        if thread is None:
            return
        if server is not None:
            server.should_exit = True
            server.force_exit = True
        thread.join(timeout=10)
        self._thread = self._loop = self._server = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve the simulator until interrupted (``promptmill simulate``)."""
    app = create_app(config)
    logger.info("simulator listening on http://%s:%d/v1", host, port)
    _uvicorn_server(app, host, port).run()


# --- command line ----------------------------------------------------------------------


def _faults_arg(value: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in value.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {','.join(FAULT_KINDS)}")
    return kinds


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's knobs (not host/port) to ``parser``; dests start with ``sim_``."""
    d = SimConfig()
    group = parser.add_argument_group("simulator")
    group.add_argument("--latency-ms", dest="sim_latency_ms", type=float, default=d.latency_ms,
                       help="delay before each answer; spread over the tokens of a stream (default %(default)s)")
    group.add_argument("--ttft-ms", dest="sim_ttft_ms", type=float, default=d.ttft_ms,
                       help="streams: delay before the first token (default: latency / 4)")
    group.add_argument("--rpm", dest="sim_rpm", type=int, default=d.rpm, help="requests per window before 429")
    group.add_argument("--tpm", dest="sim_tpm", type=int, default=d.tpm,
                       help="tokens (prompt + max_tokens) per window before 429")
    group.add_argument("--window-s", dest="sim_window_s", type=float, default=d.window_s,
                       help="sliding window of --rpm/--tpm in seconds (default %(default)s)")
    group.add_argument("--limit-style", dest="sim_limit_style", choices=("openai", "atoma"), default=d.limit_style,
                       help="429 with x-ratelimit-* and Retry-After headers (openai) or bare (atoma)")
    group.add_argument("--fault-rate", dest="sim_fault_rate", type=float, default=d.fault_rate,
                       help="share of requests that fail (0..1)")
    group.add_argument("--faults", dest="sim_faults", type=_faults_arg, default=d.faults,
                       help=f"comma-separated fault kinds (default {','.join(FAULT_KINDS)})")
    group.add_argument("--fault-seed", dest="sim_seed", type=int, default=d.seed, help="seed of the fault RNG")
    group.add_argument("--fatal-status", dest="sim_fatal_status", type=int, default=d.fatal_status,
                       help="answer every request with this status (e.g. 401)")
    group.add_argument("--fatal-after", dest="sim_fatal_after", type=int, default=d.fatal_after,
                       help="answer this many requests normally before --fatal-status applies")
    group.add_argument("--context-tokens", dest="sim_context_tokens", type=int, default=d.context_tokens,
                       help="answer 400 context_length_exceeded above prompt + max_tokens of this many")
    group.add_argument("--no-done", dest="sim_stream_done", action="store_false", default=d.stream_done,
                       help="end streams at EOF after the usage chunk, without data: [DONE] (Atoma style)")
    group.add_argument("--usage-every-chunk", dest="sim_usage_every_chunk", action="store_true",
                       default=d.usage_every_chunk, help="put cumulative usage in every stream chunk")
    group.add_argument("--keepalive", dest="sim_keepalive", action="store_true", default=d.keepalive,
                       help="send ':keep-alive' comment lines in streams")
    group.add_argument("--hang-s", dest="sim_hang_s", type=float, default=d.hang_s,
                       help="how long the 'hang' fault holds a request (default %(default)s)")
    group.add_argument("--api-key-env", dest="sim_api_key_env", metavar="VAR", default=None,
                       help="require the API key held in this environment variable")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The :class:`SimConfig` from arguments added by :func:`add_simulator_arguments`."""
    api_key = None
    if args.sim_api_key_env:
        api_key = os.environ.get(args.sim_api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {args.sim_api_key_env} is not set")
    return SimConfig(
        latency_ms=args.sim_latency_ms,
        ttft_ms=args.sim_ttft_ms,
        rpm=args.sim_rpm,
        tpm=args.sim_tpm,
        window_s=args.sim_window_s,
        limit_style=args.sim_limit_style,
        fault_rate=args.sim_fault_rate,
        faults=args.sim_faults,
        seed=args.sim_seed,
        fatal_status=args.sim_fatal_status,
        fatal_after=args.sim_fatal_after,
        context_tokens=args.sim_context_tokens,
        stream_done=args.sim_stream_done,
        usage_every_chunk=args.sim_usage_every_chunk,
        keepalive=args.sim_keepalive,
        hang_s=args.sim_hang_s,
        api_key=api_key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m batch.simulator``: serve the simulator standalone."""
    parser = argparse.ArgumentParser(prog="python -m batch.simulator", description="Serve the promptmill OpenAI-compatible simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    add_simulator_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve(config, args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

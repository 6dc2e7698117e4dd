"""Seeded faults: which request fails, and how (an error status, a dropped or held
connection, a broken or cut-off body)."""

from __future__ import annotations

import asyncio
import contextlib
import random

from starlette.types import Receive, Send

from batch.simulator.settings import SimConfig

__all__ = ["Dropped", "break_body", "break_events", "drop", "pick", "wait_disconnect"]

BAD_GATEWAY_HTML = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center></body></html>\n"
)


def pick(config: SimConfig, rng: random.Random) -> str | None:
    """The fault for this request, drawn from the seeded RNG at ``fault_rate``, or None."""
    if config.fault_rate > 0 and rng.random() < config.fault_rate:
        return config.faults[rng.randrange(len(config.faults))]
    return None


def break_body(payload: bytes, fault: str | None) -> bytes:
    """A whole answer as the fault leaves it: unparseable, cut in half, or whole."""
    if fault == "malformed":
        return payload[: len(payload) // 3] + b',,}"broken'
    if fault == "cut":
        return payload[: len(payload) // 2]
    return payload


def break_events(events: list[tuple[bytes, bool]], finish_at: int, fault: str | None) -> list[tuple[bytes, bool]]:
    """A stream as the fault leaves it: cut before it finishes, or broken after one event."""
    if fault == "cut":
        return events[: max(1, finish_at // 2 + 1)]
    if fault == "malformed":
        return [*events[:1], (b'data: {"id": "broken", "choices": [{"delta":\n\n', False)]
    return events


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def hold(receive: Receive, seconds: float) -> None:
    """The "hang" fault: hold the request until the client leaves or ``seconds`` pass."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait_disconnect(receive), seconds)


class Dropped(ConnectionResetError):
    """Raised by the app to drop a connection: uvicorn closes a connection whose app raised."""


async def drop(send: Send) -> None:
    """The "reset" fault: the connection closes with no usable answer.

    ASGI has no way to send a TCP reset, and reaching under it into the server's
    transport would tie the simulator to one server's private objects. So the
    answer starts, promising a body, and the app raises: uvicorn closes the
    connection at once, before a byte of the body. The client sees what it sees
    of a reset: the connection gone in the middle of an answer.
    """
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
    raise Dropped("simulated connection reset")

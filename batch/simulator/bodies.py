"""The OpenAI-shaped bodies the simulator sends: errors, completions and stream events."""

from __future__ import annotations

from typing import Any

import orjson

from batch.simulator.replies import Reply

__all__ = ["DONE", "KEEPALIVE", "completion", "error_body", "stream_events", "usage_of"]

SYSTEM_FINGERPRINT = "fp_promptmill_sim"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

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


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    code = code or _ERROR_CODES.get(status, "error")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "code": code}})


def usage_of(prompt_tokens: int, replies: list[Reply]) -> dict[str, Any]:
    completion_tokens = sum(reply[1] for reply in replies)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _head(chat: bool, number: int, created: int, model: Any, *, chunk: bool) -> dict[str, Any]:
    if chunk:
        kind = "chat.completion.chunk" if chat else "text_completion"
    else:
        kind = "chat.completion" if chat else "text_completion"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-sim{number:010d}",
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def completion(chat: bool, number: int, created: int, model: Any, replies: list[Reply],
               usage: dict[str, Any], response_hash: str) -> bytes:
    """A whole (non-streamed) answer, with Atoma's extra ``response_hash`` and ``signature``."""
    if chat:
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
            for i, (text, _, finish) in enumerate(replies)
        ]
    else:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, _, finish) in enumerate(replies)
        ]
    return orjson.dumps({
        **_head(chat, number, created, model, chunk=False),
        "choices": choices,
        "usage": usage,
        "response_hash": response_hash,
        "signature": "c2ltdWxhdGVk",
    })


def stream_events(chat: bool, number: int, created: int, model: Any, replies: list[Reply],
                  usage: dict[str, Any], *, include_usage: bool, every_chunk: bool,
                  done: bool) -> tuple[list[tuple[bytes, bool]], int]:
    """The server-sent events of a stream, each with whether it carries a token, and the
    index of the first finishing event (a cut stream ends before it)."""
    base = _head(chat, number, created, model, chunk=True)
    prompt_tokens = usage["prompt_tokens"]
    produced = 0

    def event(choice: dict[str, Any] | None) -> bytes:
        chunk = dict(base)
        chunk["choices"] = [] if choice is None else [choice]
        if every_chunk:
            chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                              "total_tokens": prompt_tokens + produced}
        elif include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

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
    if include_usage and not every_chunk:
        chunk = dict(base)
        chunk["choices"] = []
        chunk["usage"] = usage
        events.append((b"data: " + orjson.dumps(chunk) + b"\n\n", False))
    if done:
        events.append((DONE, False))
    return events, finish_at

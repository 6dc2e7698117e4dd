"""The wire: what an OpenAI-compatible server's answer says, parsed without a network.

``parse_completion`` reads a JSON body and ``StreamAssembler`` the ``data``
payloads of an SSE stream: a ``Completion``, or ``ResponseError`` for anything
unusable. ``error_text`` reads the code and message of a non-2xx body. The
quirks absorbed here are in DESIGN.md, "The wire", and tests/test_wire.py.

``batch.client`` reads the bytes and calls these, on the hot path of every
request: each body is parsed once with orjson, and nothing is logged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

import msgspec
import orjson

from batch.errors import BadValueError, ResponseError
from batch.records import Choice, Completion, Usage
from batch.wire_dates import parse_created

__all__ = ["StreamAssembler", "clip", "error_text", "load_object", "parse_completion", "parse_created"]

_MESSAGE_CHARS: Final = 300  # the server's message is cut to this in our errors
_SNIPPET_CHARS: Final = 80  # how much of an unusable 2xx body an error quotes
# A token count must be below this: exact as a float (the summary's JSON, the cost) and in the int64 columns.
_MAX_COUNT: Final = 2**53


def clip(text: str, limit: int = _MESSAGE_CHARS) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _token_count(value: object, name: str) -> int:
    if type(value) is int and 0 <= value < _MAX_COUNT:
        return value
    if type(value) is float and 0 <= value < _MAX_COUNT and value.is_integer():
        return int(value)
    # checked here, where it enters: the same answer again would be paid again and fail the same way
    raise BadValueError(f"usage.{name} is not a token count: {clip(repr(value), _SNIPPET_CHARS)}")


def _detail_count(details: object, name: str) -> int | None:
    # The token details are optional extras: absent, null or odd values mean "not reported";
    # a count that no column can hold is a bad answer, like one of the main counts.
    if isinstance(details, dict):
        value = details.get(name)
        if type(value) is int and value >= 0:
            if value >= _MAX_COUNT:
                raise BadValueError(f"usage.{name} is not a token count: {clip(repr(value), _SNIPPET_CHARS)}")
            return value
    return None


def _loads_lenient(data: bytes | str) -> Any:
    """JSON with invalid UTF-8 or lone surrogates in its strings: each bad piece becomes U+FFFD.

    orjson refuses both; the standard library's parser takes the text decoded with
    replacement and keeps lone surrogate escapes, which :func:`_valid_text` replaces.
    Raises ``ValueError`` when the body is not JSON at all.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return json.loads(text)


def _valid_text(value: str | None) -> str | None:
    """``value`` with every lone surrogate replaced by U+FFFD (an output column holds valid text only)."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _parse_usage(raw: object) -> Usage | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ResponseError(f"usage is not an object: {clip(repr(raw), _SNIPPET_CHARS)}")
    prompt = _token_count(raw.get("prompt_tokens"), "prompt_tokens")
    completion = _token_count(raw.get("completion_tokens"), "completion_tokens")
    total = raw.get("total_tokens")
    cached = _detail_count(raw.get("prompt_tokens_details"), "cached_tokens")
    if cached is None:
        cached = _detail_count(raw, "prompt_cache_hit_tokens")  # DeepSeek's name for cached input
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion if total is None else _token_count(total, "total_tokens"),
        cached_tokens=cached,
        reasoning_tokens=_detail_count(raw.get("completion_tokens_details"), "reasoning_tokens"),
    )


def _usage_of(payload: dict[str, Any]) -> object:
    """The raw usage of an answer or chunk: ``usage``, or Groq's ``x_groq.usage`` (its streams' last chunk)."""
    usage = payload.get("usage")
    if usage is None:
        extra = payload.get("x_groq")
        if isinstance(extra, dict):
            return extra.get("usage")
    return usage


def _content_text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content given as parts: [{"type": "text", "text": "..."}, ...]
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise ResponseError(f"{where} is not a string: {clip(repr(content), _SNIPPET_CHARS)}")


def _choice_text(choice: dict[str, Any], chat: bool) -> tuple[str | None, str | None]:
    """(text, refusal). Chat answers carry message.content and completions answers carry
    text; a server answering in the other shape is still understood."""
    message = choice.get("message")
    if isinstance(message, dict) and (chat or "text" not in choice):
        content = message.get("content")
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            # A refusal (OpenAI) comes with a null content: no text, which is not an empty one.
            return (None if content is None else _content_text(content, "choices[0].message.content")), refusal
        return _content_text(content, "choices[0].message.content"), None
    if "text" in choice:
        return _content_text(choice["text"], "choices[0].text"), None
    if chat:
        raise ResponseError("choices[0] has no message object")
    raise ResponseError("choices[0] has no text")


def _error_in_body(payload: object) -> tuple[str | None, str | None]:
    """(code, message) from an error body in any of the shapes servers use."""
    if not isinstance(payload, dict):
        return None, None
    error = payload.get("error", payload)
    if isinstance(error, str):
        error = {"message": error, "code": payload.get("code")}
    if not isinstance(error, dict):
        return None, None
    code = error.get("code")
    if code is None or code == "":
        code = error.get("type")  # OpenAI leaves code null on some errors; type names them
    message = error.get("message")
    if message is None:
        message = error.get("detail")  # FastAPI-style {"detail": ...}
    if message is not None and not isinstance(message, str):
        message = orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS).decode()
    if isinstance(code, bool) or not isinstance(code, str | int):
        code = None
    return (None if code is None else str(code)), message


def _error_from_payload(payload: dict[str, Any], what: str) -> ResponseError:
    code, message = _error_in_body(payload)
    text = f"{what} carries an error"
    if code:
        text += f" ({clip(code, 60)})"
    if message:
        text += f": {clip(message)}"
    return ResponseError(text, code=code)


def _body_snippet(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: _SNIPPET_CHARS * 4].decode("utf-8", "replace")
    return clip(" ".join(data.split()), _SNIPPET_CHARS)


def load_object(data: bytes) -> tuple[dict[str, Any], bool]:
    """A 2xx body's JSON object, and whether it needed the lenient parser (bad UTF-8 or surrogates)."""
    try:
        payload, lenient = orjson.loads(data), False
    except orjson.JSONDecodeError:
        if not data:
            raise ResponseError("empty response body") from None
        try:
            payload, lenient = _loads_lenient(data), True
        except (ValueError, RecursionError):
            raise ResponseError(f"response body is not valid JSON: {_body_snippet(data)!r}") from None
    if not isinstance(payload, dict):
        raise ResponseError(f"response body is not a JSON object: {_body_snippet(data)!r}")
    return payload, lenient


def parse_completion(data: bytes, endpoint: str, n: int = 1) -> Completion:
    """Parse a non-streamed JSON answer; raise ``ResponseError`` for anything unusable.
    ``n`` > 1 (a request asked with ``n``): choices 1 .. n-1 are kept in ``more`` too.
    Invalid UTF-8 or a lone surrogate in a string is kept as U+FFFD, as in a stream:
    a well-formed answer is never paid for twice because of a bad byte.
    """
    payload, lenient = load_object(data)
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        if payload.get("error"):
            raise _error_from_payload(payload, "response body")
        if choices == []:
            raise ResponseError("response has an empty choices list")
        raise ResponseError("response has no choices list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise ResponseError("choices[0] is not an object")
    text, refusal = _choice_text(choice, endpoint == "chat")
    completion = Completion(
        text=text,
        finish_reason=_str_or_none(choice.get("finish_reason")) or None,
        response_id=_str_or_none(payload.get("id")),
        model=_str_or_none(payload.get("model")),
        created=parse_created(payload.get("created")),
        system_fingerprint=_str_or_none(payload.get("system_fingerprint")),
        usage=_parse_usage(_usage_of(payload)),
        refusal=refusal,
        more=_more_choices(choices, endpoint == "chat", n) if n > 1 else (),
    )
    return _valid_strings(completion) if lenient else completion


def _more_choices(found: list[Any], chat: bool, n: int) -> tuple[Choice | None, ...]:
    """Choices 1 .. n-1 by their ``index`` (else their place in the list); None for one not sent."""
    more: list[Choice | None] = [None] * (n - 1)
    for place, choice in enumerate(found):
        if not isinstance(choice, dict):
            raise ResponseError(f"choices[{place}] is not an object")
        index = choice.get("index", place)
        if isinstance(index, int) and 0 < index < n:
            text, refusal = _choice_text(choice, chat)
            more[index - 1] = Choice(text, _str_or_none(choice.get("finish_reason")) or None, refusal)
    return tuple(more)


def _valid_strings(c: Completion) -> Completion:
    return msgspec.structs.replace(
        c,
        text=None if c.text is None else _valid_text(c.text) or "",
        refusal=_valid_text(c.refusal),
        finish_reason=_valid_text(c.finish_reason),
        response_id=_valid_text(c.response_id),
        model=_valid_text(c.model),
        system_fingerprint=_valid_text(c.system_fingerprint),
        more=tuple(None if m is None else Choice(_valid_text(m.text), _valid_text(m.finish_reason),
                                                 _valid_text(m.refusal)) for m in c.more),
    )


class StreamAssembler:
    """Assemble a streamed answer from the ``data`` payloads of its SSE events.

    Feed every payload in order (``[DONE]`` included, if the server sends it), then
    call ``finish``. Only choice index 0 is assembled, unless ``n`` > 1 (a request asked
    with ``n``): then choices 1 .. n-1 go to ``more``. Given a ``clock``, the time
    from ``started`` to the first non-empty piece of text is the ``ttft_s``.
    """

    __slots__ = (
        "_chat",
        "_chunks",
        "_clock",
        "_created",
        "_done",
        "_fingerprint",
        "_finish_reason",
        "_id",
        "_lenient",
        "_model",
        "_more",
        "_parts",
        "_refusals",
        "_started",
        "_ttft",
        "_usage",
    )

    def __init__(
        self, endpoint: str, *, clock: Callable[[], float] | None = None, started: float = 0.0, n: int = 1
    ) -> None:
        self._chat = endpoint == "chat"
        self._clock = clock
        self._started = started
        self._parts: list[str] = []
        self._refusals: list[str] = []
        # choices 1 .. n-1: (text pieces, refusal pieces, finish reasons) each
        self._more: list[tuple[list[str], list[str], list[str]]] | None = (
            [([], [], []) for _ in range(n - 1)] if n > 1 else None)
        self._chunks = 0
        self._done = False
        self._finish_reason: str | None = None
        self._id: str | None = None
        self._model: str | None = None
        self._created: object = None
        self._fingerprint: str | None = None
        self._usage: object = None  # the latest usage seen, parsed once in finish()
        self._ttft: float | None = None
        self._lenient = False  # an event held a lone surrogate: strings are made valid in finish()

    @property
    def done(self) -> bool:
        """True once ``[DONE]`` was fed."""
        return self._done

    def feed(self, data: str) -> None:
        if self._done:
            return
        data = data.strip()
        if not data:
            return
        if data == "[DONE]":
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            try:
                chunk = _loads_lenient(data)
            except (ValueError, RecursionError):
                raise ResponseError(f"stream event is not valid JSON: {_body_snippet(data)!r}") from None
            self._lenient = True
        if not isinstance(chunk, dict):
            raise ResponseError(f"stream event is not a JSON object: {_body_snippet(data)!r}")
        if chunk.get("error"):
            raise _error_from_payload(chunk, "stream")
        self._chunks += 1
        choices = chunk.get("choices")
        if choices:
            if not isinstance(choices, list):
                raise ResponseError("stream event choices is not a list")
            for choice in choices:
                if not isinstance(choice, dict):
                    raise ResponseError("stream event choice is not an object")
                index = choice.get("index")
                if index is not None and index != 0:
                    if self._more is not None and isinstance(index, int) and 0 < index <= len(self._more):
                        self._more_piece(self._more[index - 1], choice)
                    continue
                piece = self._piece(choice, self._refusals)
                if piece:
                    if self._ttft is None and self._clock is not None:
                        self._ttft = self._clock() - self._started
                    self._parts.append(piece)
                reason = choice.get("finish_reason")
                if isinstance(reason, str) and reason:
                    self._finish_reason = reason
        elif choices is not None and not isinstance(choices, list):
            raise ResponseError("stream event choices is not a list")
        usage = _usage_of(chunk)
        if usage is not None:
            self._usage = usage
        if self._id is None:
            self._id = _str_or_none(chunk.get("id"))
        if self._model is None:
            self._model = _str_or_none(chunk.get("model"))
        if self._created is None:
            self._created = chunk.get("created")
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str):
            self._fingerprint = fingerprint

    def _more_piece(self, entry: tuple[list[str], list[str], list[str]], choice: dict[str, Any]) -> None:
        parts, refusals, reasons = entry
        if piece := self._piece(choice, refusals):
            parts.append(piece)
        if isinstance(reason := choice.get("finish_reason"), str) and reason:
            reasons.append(reason)

    def _piece(self, choice: dict[str, Any], refusals: list[str]) -> str:
        delta = choice.get("delta")
        if isinstance(delta, dict) and (self._chat or "text" not in choice):
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                refusals.append(refusal)
            return _content_text(delta.get("content"), "delta.content")
        if "text" in choice:
            return _content_text(choice["text"], "choices[].text")
        if delta is not None and not isinstance(delta, dict):
            raise ResponseError("stream event delta is not an object")
        return ""

    def finish(self) -> Completion:
        """The assembled answer; ``ResponseError`` if the stream ended before it was complete."""
        # [DONE] after some text ends a stream normally even with neither (TGI sends
        # finish_reason "" on every chunk and no usage).
        if self._finish_reason is None and self._usage is None and not (self._done and self._parts):
            if self._chunks == 0:
                raise ResponseError("stream ended without any answer")
            raise ResponseError("stream was cut off before its finish_reason or usage")
        refusal = "".join(self._refusals) or None
        completion = Completion(
            text=None if refusal is not None and not self._parts else "".join(self._parts),
            finish_reason=self._finish_reason,
            response_id=self._id,
            model=self._model,
            created=parse_created(self._created),
            system_fingerprint=self._fingerprint,
            usage=_parse_usage(self._usage),
            ttft_s=self._ttft,
            refusal=refusal,
            more=tuple(None if not (p or r or f) else Choice(None if r and not p else "".join(p),
                                                             f[-1] if f else None, "".join(r) or None)
                       for p, r, f in self._more or ()),
        )
        return _valid_strings(completion) if self._lenient else completion


def error_text(body: bytes) -> tuple[str | None, str | None]:
    """(code, message) from a non-2xx body: JSON error shapes, HTML pages, plain text, nothing."""
    try:
        return _error_in_body(orjson.loads(body))
    except orjson.JSONDecodeError:
        pass
    text = body.decode("utf-8", "replace")
    if "<" in text:
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        text = title.group(1) if title else re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return None, text or None

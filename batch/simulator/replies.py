"""Deterministic replies and exact usage: pure functions of the request body.

A test can compute the text and usage it expects with :func:`reply_for` and
:func:`count_prompt_tokens`:

* prompt tokens: whitespace-separated words of every message's text content plus
  one per message (chat), or the words of the prompt (completions; a list of
  strings counts each, a list of token ids counts its length);
* reply: 5 to 32 words drawn from a fixed vocabulary by a hash of (model,
  messages or prompt, seed, choice index); completion tokens are its words, cut to
  ``max_tokens`` (``finish_reason`` "length" when cut, else "stop"). With ``n`` > 1
  the usage counts the words of every choice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["answer", "arithmetic", "count_prompt_tokens", "digest", "error_rate", "key_label", "max_tokens", "reply_for", "reply_from_digest"]

Reply = tuple[str, int, str]  # (text, completion_tokens, finish_reason)

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


def digest(body: Mapping[str, Any], index: int) -> bytes:
    """The hash a choice's reply is drawn from (its first 16 bytes also name the request)."""
    content = body.get("messages") if "messages" in body else body.get("prompt")
    key = orjson.dumps(
        [body.get("model"), content, body.get("seed"), index],
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
        default=str,
    )
    return hashlib.blake2b(key, digest_size=40).digest()


def max_tokens(body: Mapping[str, Any]) -> int | None:
    """``max_tokens``, else ``max_completion_tokens``, if an integer."""
    value = body.get("max_tokens")
    if value is None:
        value = body.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def reply_from_digest(digest: bytes, max_tokens: int | None) -> Reply:
    count = 5 + digest[0] % 28
    finish = "stop"
    if max_tokens is not None and max_tokens < count:
        count = max(max_tokens, 0)
        finish = "length"
    words = [_WORDS[digest[i + 1] % len(_WORDS)] for i in range(count)]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words), count, finish


def reply_for(body: Mapping[str, Any], index: int = 0) -> Reply:
    """``(text, completion_tokens, finish_reason)`` of choice ``index`` for ``body``.

    A pure function of model, messages/prompt, seed, choice index and max_tokens
    (or max_completion_tokens); the full reply has 5 to 32 words, one token each.
    A sum question ("What is 17 + 25?") gets :func:`arithmetic` instead.
    """
    return answer(body, digest(body, index), max_tokens(body))


_SUM = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")


def _last_text(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def error_rate(model: str, temperature: float) -> float:
    """How often a simulated model gets a sum wrong: "-large" models 5%, others 30%,
    plus 20 points per unit of temperature (capped at 90%)."""
    base = 0.05 if model.endswith("-large") else 0.30
    return min(0.9, base + 0.2 * max(temperature, 0.0))


def arithmetic(body: Mapping[str, Any], digest: bytes) -> str | None:
    """The answer to a sum question, right or off by 1 to 9 as :func:`error_rate` says, or None."""
    found = _SUM.search(_last_text(body))
    if found is None:
        return None
    right = int(found.group(1)) + int(found.group(2))
    temperature = body.get("temperature")
    t = float(temperature) if isinstance(temperature, int | float) and not isinstance(temperature, bool) else 0.0
    draw = int.from_bytes(digest[:4], "big") / 2**32
    wrong = draw < error_rate(str(body.get("model")), t)
    value = right + (1 + digest[4] % 9) * (1 if digest[5] % 2 else -1) if wrong else right
    return f"The answer is {value}."


def answer(body: Mapping[str, Any], digest: bytes, max_tokens: int | None) -> Reply:
    """A choice's reply: the sum's answer for a sum question, else words drawn from the digest."""
    text = arithmetic(body, digest)
    if text is None:
        return reply_from_digest(digest, max_tokens)
    count = len(text.split())
    if max_tokens is not None and max_tokens < count:
        return " ".join(text.split()[: max(max_tokens, 0)]), max(max_tokens, 0), "length"
    return text, count, "stop"


def key_label(api_key: str | None) -> str:
    """How the stats name an API key: a short hash, never the key itself."""
    if api_key is None:
        return "none"
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:8]

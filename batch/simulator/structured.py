"""Structured replies: a request carrying a JSON Schema is answered with JSON that follows it.

The schema is read from ``response_format = {type = "json_schema", json_schema = {schema}}``
(chat or completions) or vLLM's ``guided_json``. The value is drawn from the reply's
digest (:func:`batch.simulator.replies.digest`), so the same request gets the same
answer: every required property, optional ones half of the time, words of the
simulator's vocabulary for strings, the first branch of an ``anyOf``/``oneOf``.

``invalid_output_rate`` (a setting) makes that share of answers break the
schema, drawn from the digest and how many times the request was asked, so an
answer asked again may come back valid, the same way in every run: half of them
are not JSON (cut short), half leave out a required property (or, with none,
are not JSON either).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

import orjson

from batch.simulator.replies import _WORDS, Reply

__all__ = ["schema_of", "structured_reply"]


def schema_of(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a request asks its answer to follow, or None."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        inner = fmt.get("json_schema")
        if isinstance(inner, dict) and isinstance(inner.get("schema"), dict):
            schema: dict[str, Any] = inner["schema"]
            return schema
    guided = body.get("guided_json")
    if isinstance(guided, str):
        try:
            guided = orjson.loads(guided)
        except orjson.JSONDecodeError:
            return None
    return guided if isinstance(guided, dict) else None


class _Draw:
    def __init__(self, root: Mapping[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def value(self, node: Any, depth: int = 0) -> Any:
        rng = self.rng
        if not isinstance(node, dict) or depth > 8:
            return None
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target: Any = self.root
            for part in ref[1:].split("/")[1:]:
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
            return self.value(target, depth + 1)
        if "const" in node:
            return node["const"]
        if isinstance(node.get("enum"), list) and node["enum"]:
            return rng.choice(node["enum"])
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list) and node[key]:
                return self.value(node[key][0], depth + 1)
        kind = node.get("type", "object" if "properties" in node else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            required = set(node.get("required") or ())
            props = node.get("properties") or {}
            return {name: self.value(sub, depth + 1) for name, sub in props.items()
                    if name in required or rng.random() < 0.5}
        if kind == "array":
            low = int(node.get("minItems", 1))
            high = max(low, min(int(node.get("maxItems", 3)), low + 3))
            return [self.value(node.get("items", {}), depth + 1) for _ in range(rng.randint(low, high))]
        if kind == "integer":
            return rng.randint(int(node.get("minimum", 0)), int(node.get("maximum", 100)))
        if kind == "number":
            return round(rng.uniform(float(node.get("minimum", 0)), float(node.get("maximum", 100))), 3)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
        return words.capitalize()


def structured_reply(schema: Mapping[str, Any], digest: bytes, asked: int, invalid_rate: float,
                     max_tokens: int | None) -> Reply:
    """``(text, completion_tokens, finish_reason)``: JSON following ``schema`` (or, at
    ``invalid_rate``, breaking it) for the ``asked``-th time this request came."""
    value = _Draw(schema, random.Random(digest)).value(schema)
    text = orjson.dumps(value).decode()
    if invalid_rate > 0:
        draw = hashlib.blake2b(digest + asked.to_bytes(4, "big"), digest_size=8).digest()
        if int.from_bytes(draw[:4], "big") / 2**32 < invalid_rate:
            required = [k for k in schema.get("required") or () if isinstance(value, dict) and k in value]
            if draw[4] % 2 and required:
                del value[required[0]]
                text = orjson.dumps(value).decode()
            else:
                text = text[: max(1, len(text) // 2)]
    tokens = max(1, len(text) // 4)  # about four characters a token
    if max_tokens is not None and max_tokens < tokens:
        return text[: max_tokens * 4], max_tokens, "length"
    return text, tokens, "stop"

"""The wire of ``/v1/embeddings``: an answer's vectors and usage, parsed without a network.

``parse_embeddings`` reads a JSON body (``{"data": [{"index", "embedding"}], "usage"}``)
into a :class:`~batch.records.Completion` whose ``vectors`` hold one vector per
input, in input order (sorted by ``index``). A vector sent as base64
(``encoding_format = "base64"``) is decoded: little-endian float32, as the
OpenAI API sends it. Usage has no completion tokens: they are 0.
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from typing import Any

from batch.errors import ResponseError
from batch.records import Completion, Usage
from batch.wire import _error_from_payload, _token_count, load_object, parse_created

__all__ = ["parse_embeddings"]


def _vector(value: object, where: str) -> list[float]:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ResponseError(f"{where}.embedding is neither a list of numbers nor base64") from None
        if len(raw) % 4:
            raise ResponseError(f"{where}.embedding: {len(raw)} base64 bytes are not whole float32 values")
        floats = array("f")
        floats.frombytes(raw)
        if sys.byteorder == "big":
            floats.byteswap()
        return floats.tolist()
    if isinstance(value, list) and all(type(x) is float or type(x) is int for x in value):
        return [float(x) for x in value]
    raise ResponseError(f"{where}.embedding is not a list of numbers")


def _usage(raw: object) -> Usage | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ResponseError("usage is not an object")
    prompt = _token_count(raw.get("prompt_tokens"), "prompt_tokens")
    total = raw.get("total_tokens")
    return Usage(prompt_tokens=prompt, completion_tokens=0,
                 total_tokens=prompt if total is None else _token_count(total, "total_tokens"))


def parse_embeddings(data: bytes, inputs: int | None = None) -> Completion:
    """The vectors of an embeddings answer, in input order; ``inputs``: how many are expected."""
    payload, _ = load_object(data)
    items = payload.get("data")
    if not isinstance(items, list) or not items:
        if payload.get("error"):
            raise _error_from_payload(payload, "response body")
        raise ResponseError("embeddings answer has no data list")
    found: dict[int, list[float]] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ResponseError(f"data[{i}] is not an object")
        index: Any = item.get("index", i)
        if type(index) is not int or index in found:
            raise ResponseError(f"data[{i}].index is missing, not an integer or repeated")
        found[index] = _vector(item.get("embedding"), f"data[{i}]")
    if sorted(found) != list(range(len(found))) or (inputs is not None and len(found) != inputs):
        raise ResponseError(f"embeddings answer has {len(found)} vectors for {inputs or '?'} inputs")
    model = payload.get("model")
    return Completion(
        text=None, finish_reason=None, response_id=None,
        model=model if isinstance(model, str) else None,
        created=parse_created(payload.get("created")), system_fingerprint=None,
        usage=_usage(payload.get("usage")),
        vectors=[found[i] for i in range(len(found))],
    )

"""The simulator's ``/v1/embeddings``: deterministic vectors for any input.

Each input's vector is drawn from a hash of the model and the input, so the same
input always gets the same vector; its length is the request's ``dimensions``,
else the ``embedding_dim`` setting. Usage counts the whitespace-split words of
each input (a list of token ids: its length). ``encoding_format = "base64"``
answers as the OpenAI API does: little-endian float32, base64-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["EmbedRequest", "answer", "parse", "vector"]


class BadEmbedRequest(Exception):
    pass


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """A checked embeddings request: its inputs and what it costs at admission."""

    body: dict[str, Any]
    inputs: list[Any]
    prompt_tokens: int
    dimensions: int

    @property
    def reserve(self) -> int:
        return self.prompt_tokens


def _tokens(item: Any) -> int:
    if isinstance(item, str):
        return max(len(item.split()), 1)
    return len(item)


def parse(raw: bytes, default_dim: int) -> EmbedRequest:
    """The request checked (``BadEmbedRequest`` with the reason otherwise)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadEmbedRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise BadEmbedRequest("'model' is required and must be a string")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)) \
        else value
    if not isinstance(inputs, list) or not inputs:
        raise BadEmbedRequest("'input' must be a string or a non-empty list")
    for item in inputs:
        if not (isinstance(item, str) and item) and not (isinstance(item, list) and all(type(t) is int for t in item)):
            raise BadEmbedRequest("each input must be a non-empty string or a list of token ids")
    dim = body.get("dimensions", default_dim)
    if type(dim) is not int or not 1 <= dim <= 8192:
        raise BadEmbedRequest("'dimensions' must be an integer from 1 to 8192")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise BadEmbedRequest("'encoding_format' must be 'float' or 'base64'")
    return EmbedRequest(body, inputs, sum(_tokens(item) for item in inputs), dim)


def vector(model: str, item: Any, dim: int) -> list[float]:
    """The vector of one input: floats in [-1, 1) drawn from its hash, exact in float32."""
    seed = orjson.dumps([model, item])
    out: list[float] = []
    block = 0
    while len(out) < dim:
        digest = hashlib.blake2b(seed + block.to_bytes(4, "little"), digest_size=64).digest()
        out.extend((v - 32768) / 32768 for v in struct.unpack("<32H", digest))
        block += 1
    return out[:dim]


def answer(request: EmbedRequest) -> bytes:
    """The answer's JSON body."""
    model = request.body["model"]
    b64 = request.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(request.inputs):
        values = vector(model, item, request.dimensions)
        embedding: Any = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if b64 else values
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    usage = {"prompt_tokens": request.prompt_tokens, "total_tokens": request.prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})

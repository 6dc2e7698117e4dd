"""The seeds (the Atoma SDK's response models) as they travel on the wire: snake_case JSON.

Shared by the parser tests (tests/test_parsers.py) and the client's (tests/test_client.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

MODEL = "meta-llama/Llama-3.3-70B-Instruct"

CHAT_RESPONSE: dict[str, Any] = {
    "choices": [
        {
            "finish_reason": "stop",
            "index": 0,
            "message": {"content": "Hello! How can you help me today?", "name": "john_doe", "role": "user"},
        }
    ],
    "created": 1677652288,
    "id": "chatcmpl-123",
    "model": MODEL,
    "system_fingerprint": "fp_44709d6fcb",
    "usage": {"completion_tokens": 12, "prompt_tokens": 9, "total_tokens": 21},
}
CHAT_CHUNK: dict[str, Any] = {
    "choices": [{"delta": {"content": "Hello", "role": "assistant"}, "index": 0}],
    "created": 1677652288,
    "id": "chatcmpl-123",
    "model": MODEL,
    "object": "chat.completion.chunk",
    "usage": {
        "completion_tokens": 12,
        "prompt_tokens": 9,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 10},
        "total_tokens": 21,
    },
}
COMPLETIONS_RESPONSE: dict[str, Any] = {
    "choices": [{"finish_reason": "stop", "index": 0, "logprobs": None, "text": "This is a test"}],
    "created": "2021-01-01T00:00:00Z",
    "id": "cmpl-1234567890",
    "model": MODEL,
    "object": "text_completion",
    "system_fingerprint": "system-fingerprint",
    "usage": {
        "completion_tokens": 10,
        "completion_tokens_details": {
            "accepted_prediction_tokens": 10,
            "audio_tokens": 0,
            "reasoning_tokens": 10,
            "rejected_prediction_tokens": 0,
        },
        "prompt_tokens": 10,
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 10},
        "total_tokens": 20,
    },
}
COMPLETIONS_CHUNK: dict[str, Any] = {
    "choices": [{"finish_reason": "stop", "index": 0, "logprobs": None, "text": "This is a test"}],
    "created": "2021-01-01 00:00:00 +0000 UTC",
    "id": "cmpl-1234567890",
    "model": MODEL,
    "object": "text_completion",
    "system_fingerprint": "system-fingerprint",
}
NEW_YEAR_2021 = datetime(2021, 1, 1, tzinfo=UTC)

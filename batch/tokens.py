"""A request's tokens, estimated from its body for rate limiting (no tokenizer is downloaded).

One estimator: the request builder (``batch.prompts``) counts a row's prompt with
:func:`prompt_tokens`, the runner adds :func:`answer_tokens`, and the limiter
reserves the sum.

A character count divided by four, plus four tokens per chat message and three
for the reply's priming: this over-estimates English slightly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["answer_tokens", "content_chars", "estimate_tokens", "messages_tokens", "prompt_tokens", "tokens_for"]

# an image or audio part: a rough flat cost rather than nothing
_PART_CHARS = 340
# what Atoma reserves for a body with no max_tokens
_DEFAULT_MAX_TOKENS = 8192


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a request may use: :func:`prompt_tokens` plus :func:`answer_tokens`."""
    return prompt_tokens(body) + answer_tokens(body)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt's tokens: its ``messages`` (content and names), its ``prompt`` or an embeddings ``input``."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return messages_tokens(messages)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, list):
        return tokens_for(sum(len(p) for p in prompt if isinstance(p, str)), 0)
    return tokens_for(len(prompt) if isinstance(prompt, str) else 0, 0)


def messages_tokens(messages: Sequence[Any]) -> int:
    """The tokens of a chat request's ``messages``; what is not a message counts only its four."""
    chars = 0
    for message in messages:
        if isinstance(message, Mapping):
            content = message.get("content")
            # most content is a plain string: skip the general path for it
            chars += len(content) if type(content) is str else content_chars(content)
            name = message.get("name")
            if isinstance(name, str):
                chars += len(name)
    return tokens_for(chars, len(messages))


def tokens_for(chars: int, messages: int) -> int:
    """The estimate for ``chars`` characters of text in ``messages`` chat messages (0: a plain prompt)."""
    return -(-chars // 4) + (3 + 4 * messages if messages else 0)


def answer_tokens(body: Mapping[str, Any]) -> int:
    """``max_tokens * n``: what a server reserves for the answer at admission.

    A body with no ``max_tokens`` (or ``max_completion_tokens``) is counted with
    8192, what Atoma reserves for it. An embeddings body (``input``, no prompt) has no answer tokens.
    """
    if "input" in body and "messages" not in body and "prompt" not in body:
        return 0
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        max_tokens = _DEFAULT_MAX_TOKENS
    n = body.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        n = 1
    return max_tokens * n


def content_chars(content: Any) -> int:
    """Characters of a message's content: a string, or a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                total += len(text) if isinstance(text, str) else _PART_CHARS
            elif isinstance(part, str):
                total += len(part)
        return total
    return 0

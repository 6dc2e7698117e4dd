"""The simulator's replies and usage: pure functions of the request body."""

from __future__ import annotations

from batch.simulator import count_prompt_tokens, reply_for


def test_prompt_token_count_rules() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a b c"},
                                                        {"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": None}]}
    assert count_prompt_tokens(parts) == 3 + 2
    assert count_prompt_tokens({"prompt": ["one two", "three"]}) == 3
    assert count_prompt_tokens({"prompt": [101, 7, 42, 9]}) == 4


def test_a_reply_is_cut_to_max_tokens_or_max_completion_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    text, tokens, finish = reply_for(body)
    assert (len(text.split()), finish) == (tokens, "stop") and 5 <= tokens <= 32
    for key in ("max_tokens", "max_completion_tokens"):
        cut = reply_for({**body, key: 2})
        assert cut == (" ".join(text.split()[:2]), 2, "length")

"""The one token estimator (batch.tokens): prompt characters / 4 plus per-message costs, plus max_tokens * n."""

from __future__ import annotations

from batch.tokens import estimate_tokens, prompt_tokens


def test_estimate_counts_prompt_and_max_tokens_times_n() -> None:
    chat = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 100, "n": 2}
    assert estimate_tokens(chat) == 10 + 4 + 3 + 200
    completion = {"prompt": "y" * 41, "max_tokens": 7}
    assert estimate_tokens(completion) == 11 + 7


def test_estimate_without_max_tokens_counts_what_atoma_reserves() -> None:
    assert estimate_tokens({"prompt": ""}) == 8192


def test_estimate_tolerates_content_parts_and_odd_values() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "abcd" * 5}]},
            {"role": "assistant", "content": None},
            "not a message",
        ],
        "max_tokens": 1,
        "n": "two",
    }
    assert estimate_tokens(body) == 5 + 3 + 4 * 3 + 1


def test_a_message_name_counts_like_its_content() -> None:
    named = {"messages": [{"role": "user", "name": "ab", "content": "cd"}]}
    plain = {"messages": [{"role": "user", "content": "abcd"}]}
    assert prompt_tokens(named) == prompt_tokens(plain) == 1 + 4 + 3
